#!/usr/bin/env bash
# CPU-side data preparation for the second RedKnot test model (scripts/rag2/README.md).  Deterministic;
# everything goes to the ignored folder .devcarry/ (nothing from ../shared is committed).  Needs python3,
# node + npm (the tokenizer: HF tokenizers' prebuilt Node binding), apt-get + dpkg-deb (the corpus).
#   bash scripts/rag2/prep.sh            # all steps (~10 min on 2 cores)
#   STEPS="eval" bash scripts/rag2/prep.sh
# Outputs (.devcarry/rag2/):
#   tokenizer/tokenizer.json, tokenizer_config.json   16384-entry byte-level BPE
#   corpus.u16.xz + corpus.u16.idx                     pretraining tokens (uint16 LE; doc offsets uint32)
#   passages-train.jsonl.gz                           real passages for the RAG training stream
#   eval/rag2-8k.jsonl.gz, eval/rag2-4k.jsonl.gz      held-out eval sets (`redknot eval` format)
#   calib/rag2-calib.jsonl.gz, calib/rag2-calib.txt   calibration / head-profile prompts (other seed)
#   calib/rag2-calib-4k.jsonl.gz                      4K calibration prompts (a third seed)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
D=.devcarry/rag2
STEPS="${STEPS:-corpus tokenizer encode passages eval}"
mkdir -p "$D" "$D/eval" "$D/calib"
has() { [[ " $STEPS " == *" $1 "* ]]; }
[ -d scripts/corpus/node_modules ] || (cd scripts/corpus && npm ci --no-audit --no-fund)

if has corpus; then
  python3 scripts/corpus/build_corpus.py --out .devcarry/corpus
fi

if has tokenizer; then
  tmp="$(mktemp -d)"
  python3 - "$tmp" <<'PY'
import gzip, json, os, sys
sys.path.insert(0, "scripts/rag"); sys.path.insert(0, "scripts/rag2")
import gen_data as G, gen_rag2 as R
t = sys.argv[1]
with open(os.path.join(t, "corpus.txt"), "w") as f:
    for l in gzip.open(".devcarry/corpus/corpus.jsonl.gz", "rt"):
        f.write(json.loads(l)["text"] + "\n\n")
ps = R.load_passages()
sents = R.sentences(ps["train"])
with open(os.path.join(t, "worlds.txt"), "w") as f:
    for i in range(30):
        w = R.make_world(f"tok2-{i}", 1.0, sents, 0.5)
        for d in w.docs: f.write(d["text"] + "\n\n")
        for q in w.q_single: f.write("Question: " + q[1] + "\nAnswer: " + q[2] + "\n")
        for q in w.q_multi: f.write("Question: " + q[2] + "\nAnswer: " + q[3] + "\n")
        for q in w.pairs: f.write("Question: " + q[2] + "\nAnswer: " + q[3] + "\n")
with open(os.path.join(t, "passages.txt"), "w") as f:
    for p in ps["train"]: f.write(p + "\n\n")
PY
  node scripts/corpus/tok.js train --vocab 16384 --out "$D/tokenizer" "$tmp/corpus.txt" "$tmp/worlds.txt" "$tmp/passages.txt"
  rm -rf "$tmp"
fi

if has encode; then
  node scripts/corpus/tok.js encode-jsonl --tokenizer "$D/tokenizer/tokenizer.json" \
    --in .devcarry/corpus/corpus.jsonl.gz --field text --eos --out "$D/corpus.u16"
  xz -T2 -6 -f "$D/corpus.u16"
fi

if has passages; then
  python3 - "$D" <<'PY'
import gzip, json, os, sys
sys.path.insert(0, "scripts/rag2")
import gen_rag2 as R
ps = R.load_passages()
for split in ("train", "eval"):  # the GPU machine has no ../shared: the passages travel
    with gzip.open(os.path.join(sys.argv[1], f"passages-{split}.jsonl.gz"), "wt", encoding="utf-8",
                   compresslevel=9) as f:
        for p in ps[split]:
            f.write(json.dumps({"text": p}) + "\n")
print(f"passages: train {len(ps['train'])}, eval {len(ps['eval'])}", file=sys.stderr)
PY
fi

if has eval; then
  T="$D/tokenizer/tokenizer.json"
  python3 scripts/rag2/gen_rag2.py --tokens 8192 --per-task 200 --seed 28001 --tokenizer "$T" --out "$D/eval/rag2-8k.jsonl.gz"
  python3 scripts/rag2/gen_rag2.py --tokens 4096 --per-task 200 --seed 24001 --tokenizer "$T" --out "$D/eval/rag2-4k.jsonl.gz"
  python3 scripts/rag2/gen_rag2.py --tokens 2048 --per-task 50 --seed 22001 --tokenizer "$T" --out "$D/eval/rag2-2k.jsonl.gz"
  python3 scripts/rag2/gen_rag2.py --tokens 8192 --per-task 8 --seed 27001 --tokenizer "$T" \
    --out "$D/calib/rag2-calib.jsonl.gz" --calib-text "$D/calib/rag2-calib.txt"
  # a second calibration length (redknot calibrate wants several prompt lengths), its own seed
  python3 scripts/rag2/gen_rag2.py --tokens 4096 --per-task 4 --seed 27401 --tokenizer "$T" \
    --out "$D/calib/rag2-calib-4k.jsonl.gz"
fi
ls -la "$D" "$D/eval" "$D/calib"
