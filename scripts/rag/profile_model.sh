#!/usr/bin/env bash
# Regenerates models/redknot-rag-8k/head_profile.json: calibration prompts from the data generator
# (seed 777, never used for training or evaluation; documents + question + answer), then
# `redknot profile`. Ratio 0.1875 = 3 of 16 KV heads global: run 7 was trained with 3 free heads, and a
# fourth (ratio 0.25 picks (3,1) by a 0.045 prefix shift) costs FLOPs and buys no accuracy
# (docs/benchmarks.md). RATIO, WINDOW, MAX_TOKENS and OUT override the defaults.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tmp="$(mktemp -d)"
python3 "$root/scripts/rag/gen_data.py" --tokens 2048 --per-task 2 --seed 777 --out "$tmp/calib.jsonl" >/dev/null
python3 - "$tmp/calib.jsonl" "$tmp/calib.txt" <<'PY'
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        # Whole RAG prompts with their answers: retrieval heads only look far when a question
        # asks about an earlier document, so documents alone would hide them.
        s = json.loads(line)
        out.write("".join(seg + "\n\n" for seg in s["segments"]) + "Question: " + s["question"]
                  + "\nAnswer: " + s["answers"][0] + "\n\n")
PY
"$root/build/redknot" profile --model "$root/models/redknot-rag-8k" --calib "$tmp/calib.txt" \
  --out "${OUT:-$root/models/redknot-rag-8k/head_profile.json}" --ratio "${RATIO:-0.1875}" --window "${WINDOW:-256}" --sink 4 \
  --max-tokens "${MAX_TOKENS:-8192}" --bos always
rm -rf "$tmp"
