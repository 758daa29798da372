#!/usr/bin/env bash
# One GPU call (<= 10 min): `redknot calibrate` and `redknot eval` of the second test model with the
# CUDA backend (scripts/rag2/README.md, issue #24). The CLI is built on the development machine
# (scripts/pack-device-server.sh) and carried as one archive, the weights as the training call's
# byte-plane xz shards:
#   tar -cJf .devcarry/cli.tar.xz build-srv-cuda/redknot .devlibs
#   carry: .devcarry/cli.tar.xz WEIGHTS_DIR .devcarry/rag2/calib .devcarry/rag2/eval [.devcarry/agree]
#   bash scripts/rag2/gpu-eval.sh --weights WEIGHTS_DIR [--calibrate "ARGS"] [--settings DIR] \
#        [--eval "FILE[:N] ..."] [--modes all]
# --calibrate runs `redknot calibrate --backend cuda ARGS --out $OUT/calib` and evaluates with what it
# wrote; --settings DIR uses a head_profile.json + reuse_settings.json written before. Every (eval
# file, mode) gets one `redknot eval --json` with an even share of the time left and --time-limit
# (a cut mode reports the samples it finished), full prefill's logits shared through --reference;
# the JSON reports, predictions and the calibration output go to $OUT; a summary table per file is
# printed at the end. BACKEND=cpu BIN=build/redknot runs the same steps on the CPU (a dry run).
# DEADLINE (seconds from the start, default 570): a step that would start after it is skipped, and
# every step is cut at it (what was written so far stays in $OUT); calibrate is cut at CALIB_S (240);
# when it is cut or refuses, the --settings ones (if any) are used, and the output says so.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
start=$(date +%s)
DEST="${OUT:-/tmp/rag2_eval}"
mkdir -p "$DEST"
weights="" calib="" settings="" evals="" modes=all
while [ $# -gt 0 ]; do
  case "$1" in
    --weights) weights="$2"; shift 2 ;;
    --calibrate) calib="$2"; shift 2 ;;
    --settings) settings="$2"; shift 2 ;;
    --eval) evals="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$weights" ] || { echo "--weights DIR (the training call's *.bp.xz + model_small_files.tar) is required" >&2; exit 2; }
[ -f .devcarry/cli.tar.xz ] && tar -xJf .devcarry/cli.tar.xz
source scripts/gpu-common.sh
gpu_card_info
BIN="${BIN:-$ROOT/build-srv-cuda/redknot}"
gpu_carried_cli "$BIN"
M=/var/tmp/redknot-rag2
rm -rf "$M"
python3 scripts/rag2/unpack.py "$weights" "$M" >/dev/null || { echo "unpack failed" >&2; exit 1; }
if [ -n "$settings" ]; then
  cp "$settings"/head_profile.json "$settings"/reuse_settings.json "$M/"
fi
left() { echo $((start + ${DEADLINE:-570} - $(date +%s))); }
t0=$(date +%s)
if [ -n "$calib" ]; then
  # shellcheck disable=SC2086
  timeout "$(( ${CALIB_S:-240} < $(left) ? ${CALIB_S:-240} : $(left) ))" "$BIN" calibrate --backend "${BACKEND:-cuda}" --model "$M" $calib --out "$DEST/calib" --quiet >"$DEST/calibrate.txt" 2>&1
  rc=$?
  echo "calibrate: rc $rc in $(($(date +%s) - t0)) s"
  cat "$DEST/calibrate.txt"
  if [ "$rc" -eq 0 ] || [ -z "$settings" ]; then
    cp "$DEST/calib/head_profile.json" "$DEST/calib/reuse_settings.json" "$M/" 2>/dev/null
  else
    echo "calibrate refused or was cut (rc $rc): the evals use --settings $settings"
  fi
fi
# One eval per (file, mode), full prefill's logits shared through --reference (computed by the
# first, read by the rest), each mode given an even share of the time left for the evals to come,
# so that a slow mode cannot starve the others, and --time-limit keeps what each finished.
IFS=',' read -r -a mode_list <<<"$([ "$modes" = all ] && echo full,prefix,naive,cacheblend,epic,redknot || echo "$modes")"
runs_left=$(( $(echo $evals | wc -w) * ${#mode_list[@]} ))
for e in $evals; do
  f="${e%%:*}" n=0
  [ "$f" != "$e" ] && n="${e#*:}"
  tag="$(basename "$f" .jsonl.gz)"
  for mode in "${mode_list[@]}"; do
    share=$(( $(left) / runs_left )); runs_left=$((runs_left - 1))
    [ "$share" -gt 20 ] || { echo "eval $tag $mode skipped: no time"; continue; }
    t1=$(date +%s)
    # --time-limit stops between samples and still reports (n of N); timeout is the backstop.
    timeout "$share" "$BIN" eval --backend "${BACKEND:-cuda}" --model "$M" --data "$f" --n "$n" --mode "$mode" \
      --json --quiet --time-limit "$((share - 10))" --reference "$DEST/ref_$tag.bin" \
      --predictions "$DEST/pred_${tag}__$mode.jsonl" >"$DEST/eval_${tag}__$mode.json" 2>"$DEST/eval_${tag}__$mode.err" \
      || { echo "eval $tag $mode failed:"; tail -5 "$DEST/eval_${tag}__$mode.err"; continue; }
    echo "eval $tag $mode: $(($(date +%s) - t1)) s"
  done
done
rm -f "$DEST"/ref_*.bin
gzip -f "$DEST"/pred_*.jsonl 2>/dev/null
python3 - "$DEST" <<'PY'
import collections, glob, json, os, sys
by_set = collections.defaultdict(list)  # eval_<set>__<mode>.json, grouped by set, in run order
for p in sorted(glob.glob(os.path.join(sys.argv[1], "eval_*__*.json")), key=os.path.getmtime):
    try:
        r = json.load(open(p))
    except Exception as e:
        print(p, "unreadable:", e); continue
    by_set[os.path.basename(p)[5:-5].rsplit("__", 1)[0]].append(r)
for name, rs in by_set.items():
    tasks = sorted({t for r in rs for t in r.get("tasks", {})})
    print(f"\n{name}\n| mode | n | EM | top-1 | logits cos | FLOPs saved | TTFT p50 ms | " +
          " | ".join(f"EM {t}" for t in tasks) + " |")
    for r in rs:
        n = f"{r['n']} of {r['n_requested']}" if r.get("truncated") else str(r["n"])
        print(f"| {r['mode']} | {n} | {100 * r['em']:.1f} | {r['top1_match']:.3f} | {r['logits_cos']:.4f} | "
              f"{100 * r['flops_reduction']:.1f}% | {r['ttft_ms_p50']:.1f} | " +
              " | ".join(f"{100 * r['tasks'][t]['em']:.1f}" if t in r.get("tasks", {}) else "-" for t in tasks) + " |")
PY
ls -la "$DEST"
