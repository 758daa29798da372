#!/usr/bin/env bash
# On the GPU machine: `redknot eval --backend cuda` over the shipped model's 8K eval set (and a
# held-out set from the data generator), full prefill once, then redknot under several Sparse FFN
# settings: a sweep that takes hours on the 2-core CPU takes minutes here. The CLI is built here
# (scripts/pack-device-server.sh) and carried: ["build-srv-cuda/redknot", ".devlibs"].
# Usage: [SETTINGS="none tier 1,1,0.5,..."] [DATA="eval calib"] [CALIB_PER_TASK=50] \
#          scripts/gpu-reuse-sweep.sh
#   a setting is "none" (--no-sparse-ffn), "tier" (--dense-until 2 --mass 0.8 --deep-start 4
#   --mass-deep 0.5) or a --layer-mass list, optionally followed by @N for --recent-n N. Prints a
#   table; the JSON reports go to $OUT/sweep.tgz, the predictions to $OUT/predictions.tgz
#   ($OUT or /tmp). EXTRA: more eval arguments for every setting (e.g. "--recent-n 256"), TAG: a
#   prefix for its rows.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/build-srv-cuda/redknot}"
DEST="${OUT:-/tmp}"
LOG="$DEST/sweep"
mkdir -p "$LOG"
source "$ROOT/scripts/gpu-common.sh"
gpu_card_info
gpu_carried_cli "$BIN"
M="$ROOT/models/redknot-rag-8k"
python3 "$ROOT/scripts/rag/gen_data.py" --seed 9001 --per-task "${CALIB_PER_TASK:-50}" --out "$LOG/calib8k.jsonl" >/dev/null
declare -A FILE=([eval]="$ROOT/data/eval/rag-8k.jsonl.gz" [calib]="$LOG/calib8k.jsonl")
for d in ${DATA:-eval calib}; do
  ref="$LOG/ref_$d.bin"
  first=1
  for s in ${SETTINGS:-none tier}; do
    lm="${s%@*}"
    args=()
    [ "$lm" != "$s" ] && args=(--recent-n "${s#*@}")
    case "$lm" in
      none) args+=(--no-sparse-ffn) ;;
      tier) args+=(--dense-until 2 --mass 0.8 --deep-start 4 --mass-deep 0.5) ;;
      *) args+=(--layer-mass "$lm") ;;
    esac
    modes=redknot
    [ $first = 1 ] && modes=full,redknot
    first=0
    tag="${d}_${TAG:-}${s//,/_}"
    t0=$(date +%s)
    "$BIN" eval --backend cuda --model "$M" --data "${FILE[$d]}" --mode $modes \
      --head-profile "$M/head_profile.json" "${args[@]}" ${EXTRA:-} --reference "$ref" --json --quiet \
      --predictions "$LOG/pred_$tag.jsonl" >"$LOG/$tag.json" 2>"$LOG/$tag.err" \
      || { echo "$tag failed:"; tail -5 "$LOG/$tag.err"; continue; }
    echo "$tag: $(($(date +%s) - t0)) s" >>"$LOG/times.txt"
  done
done
python3 - "$LOG" <<'PY'
import glob, json, os, sys
print("| data | setting | mode | EM | top-1 | FLOPs saved | TTFT p50 ms | per family EM |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    tag = os.path.basename(f)[:-5]
    try:
        j = json.load(open(f))
    except ValueError:
        continue
    for r in j if isinstance(j, list) else [j]:
        fam = " ".join(f"{k} {100 * v['em']:.1f}" for k, v in sorted(r["tasks"].items()))
        d, s = tag.split("_", 1)
        print(f"| {d} | {s} | {r['mode']} | {100 * r['em']:.1f} | {r['top1_match']:.3f} | "
              f"{100 * r['flops_reduction']:.2f}% | {r['ttft_ms_p50']:.1f} | {fam} |")
PY
# Reports and predictions apart: the predictions of a long sweep can pass what `run` brings back.
(cd "$LOG" && tar czf "$DEST/sweep.tgz" ./*.json times.txt && tar czf "$DEST/predictions.tgz" pred_*.jsonl) \
  && rm -rf "$LOG"
