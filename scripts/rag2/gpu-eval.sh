#!/usr/bin/env bash
# One GPU call (<= 10 min): `redknot calibrate` and `redknot eval` of the second test model with the
# CUDA backend (scripts/rag2/README.md, issue #24). The CLI is built on the development machine
# (scripts/pack-device-server.sh) and carried as one archive, the weights as the training call's
# byte-plane xz shards:
#   tar -cJf .devcarry/cli.tar.xz build-srv-cuda/redknot .devlibs
#   carry: .devcarry/cli.tar.xz .devcarry/rag2/calib .devcarry/rag2/eval [.devcarry/agree]
#   bash scripts/rag2/gpu-eval.sh --weights models/redknot-rag2 [--calibrate "ARGS"] [--settings DIR] \
#        [--eval "FILE[:N] ..."] [--modes all]
# --calibrate runs `redknot calibrate --backend cuda ARGS --out $OUT/calib`; redknot mode is evaluated
# with what it wrote (when it refuses or is cut: with --settings DIR's head_profile.json +
# reuse_settings.json if given, and the output says so). The model is small (a step is launch-bound and
# leaves the GPU idle most of the time), so the work runs concurrently: calibrate beside full prefill;
# full prefill of each eval file first (it writes the reference logits the other modes read,
# `--reference`), then every other mode at once, redknot as soon as calibrate is done. Each eval is
# `redknot eval --json --time-limit` (a cut mode reports the samples it finished, n of N). Modes other
# than redknot run with the calibrated reuse chunk (REUSE_CHUNK, default 512) so that every mode
# forwards the same rows per pass. JSON reports, predictions and the calibration go to
# $OUT/rag2-eval.tar.gz; each finished mode prints a line, and a summary table per file is printed at
# the end (and $OUT/summary.md). BACKEND=cpu BIN=build/redknot: a dry run on the CPU.
# DEADLINE (seconds from the start, default 570) cuts every step: keep it ~30 s under the call's
# limit_s, which is less than timeout_s when little device time is left; calibrate is cut at CALIB_S (240);
# full prefill of a file gets at most FULL_SHARE (default 0.5) of that file's time.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
start=$(date +%s)
# The device returns at most 8 files from $OUT, and nothing a killed call had yet to write: the work
# goes to DEST (outside $OUT), and $OUT gets one tarball of it (without the reference logits), renewed
# every 20 s while the call runs and once at the end, plus the summary.
RESULTS="${OUT:-/tmp/rag2_eval}"
DEST=/var/tmp/rag2-eval-work
rm -rf "$DEST"; mkdir -p "$DEST" "$RESULTS"
pack_results() {
  tar -czf "$RESULTS/rag2-eval.tar.gz.tmp" -C "$DEST" --exclude='ref_*.bin' . 2>/dev/null &&
    mv "$RESULTS/rag2-eval.tar.gz.tmp" "$RESULTS/rag2-eval.tar.gz"
}
( while sleep 20; do pack_results; done ) &
packer_pid=$!
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
[ -n "$weights" ] || { echo "--weights DIR (models/redknot-rag2, or a training call's *.bp.xz + model_small_files.tar) is required" >&2; exit 2; }
[ -f .devcarry/cli.tar.xz ] && tar -xJf .devcarry/cli.tar.xz
source scripts/gpu-common.sh
gpu_card_info
BIN="${BIN:-$ROOT/build-srv-cuda/redknot}"
gpu_carried_cli "$BIN"
M=/var/tmp/redknot-rag2
rm -rf "$M"
if [ -d "$weights/packed" ]; then  # the shipped folder (models/redknot-rag2): small files + packed/
  bash scripts/rag2/get-weights.sh "$M" "$weights" >/dev/null
else                               # a training call's files
  python3 scripts/rag2/unpack.py "$weights" "$M" >/dev/null
fi || { echo "unpack failed" >&2; exit 1; }
# the other modes run on the plain folder; redknot gets its settings below (--settings, calibrate)
rm -f "$M/head_profile.json" "$M/reuse_settings.json"
left() { echo $((start + ${DEADLINE:-570} - $(date +%s))); }
# redknot runs on its own view of the model folder (links to the weights + the settings it is given),
# so that the calibration can finish while the other modes read the plain folder.
MR=/var/tmp/redknot-rag2-redknot
rm -rf "$MR"; mkdir -p "$MR"
for f in "$M"/*; do ln -s "$f" "$MR/"; done
use_settings() {  # DIR: the head profile + reuse settings redknot mode runs with
  cp "$1/head_profile.json" "$1/reuse_settings.json" "$MR/" 2>/dev/null
}
[ -n "$settings" ] && use_settings "$settings"
calib_pid=""
if [ -n "$calib" ]; then
  (
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout "$(( ${CALIB_S:-240} < $(left) ? ${CALIB_S:-240} : $(left) ))" "$BIN" calibrate --backend "${BACKEND:-cuda}" \
      --model "$M" $calib --out "$DEST/calib" --quiet >"$DEST/calibrate.txt" 2>&1
    rc=$?
    echo "calibrate: rc $rc in $(($(date +%s) - t0)) s" >>"$DEST/calibrate.txt"
    if [ "$rc" -eq 0 ] || [ -z "$settings" ]; then
      use_settings "$DEST/calib"
    else
      echo "calibrate refused or was cut (rc $rc): redknot runs with --settings $settings" >>"$DEST/calibrate.txt"
    fi
  ) &
  calib_pid=$!
fi
run_eval() {  # TAG FILE N MODE SECONDS MODEL_DIR [extra args]
  local tag="$1" f="$2" n="$3" mode="$4" secs="$5" dir="$6"; shift 6
  [ "$secs" -gt 15 ] || { echo "eval $tag $mode skipped: no time"; return; }
  local t1; t1=$(date +%s)
  # --time-limit stops between samples and still reports (n of N); timeout is the backstop.
  timeout "$secs" "$BIN" eval --backend "${BACKEND:-cuda}" --model "$dir" --data "$f" --n "$n" --mode "$mode" \
    --json --quiet --time-limit "$((secs - 10))" --reference "$DEST/ref_$tag.bin" "$@" \
    --predictions "$DEST/pred_${tag}__$mode.jsonl" >"$DEST/eval_${tag}__$mode.json" 2>"$DEST/eval_${tag}__$mode.err" \
    || { echo "eval $tag $mode failed:"; tail -5 "$DEST/eval_${tag}__$mode.err"; return; }
  # one line per finished mode on stdout too, so that a call cut later still shows it
  echo "eval $tag $mode: $(($(date +%s) - t1)) s: $(python3 scripts/rag2/eval_summary.py --line "$DEST/eval_${tag}__$mode.json" 2>&1)"
}
IFS=',' read -r -a mode_list <<<"$([ "$modes" = all ] && echo full,prefix,naive,cacheblend,epic,redknot || echo "$modes")"
files_left=$(echo $evals | wc -w)
for e in $evals; do
  f="${e%%:*}" n=0
  [ "$f" != "$e" ] && n="${e#*:}"
  tag="$(basename "$f" .jsonl.gz)"
  file_end=$(( $(date +%s) + $(left) / files_left )); files_left=$((files_left - 1))
  until_end() { echo $((file_end - $(date +%s))); }
  if [[ " ${mode_list[*]} " == *" full "* ]]; then
    run_eval "$tag" "$f" "$n" full "$(awk -v t="$(until_end)" -v s="${FULL_SHARE:-0.5}" 'BEGIN{print int(t*s)}')" "$M"
  fi
  pids=()
  for mode in "${mode_list[@]}"; do
    case "$mode" in
      full) ;;
      redknot)
        ( [ -n "$calib_pid" ] && while kill -0 "$calib_pid" 2>/dev/null; do sleep 1; done
          run_eval "$tag" "$f" "$n" redknot "$(until_end)" "$MR" ) & pids+=($!) ;;
      *) run_eval "$tag" "$f" "$n" "$mode" "$(until_end)" "$M" --reuse-chunk "${REUSE_CHUNK:-512}" & pids+=($!) ;;
    esac
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
done
[ -n "$calib_pid" ] && wait "$calib_pid" 2>/dev/null
[ -n "$calib" ] && cat "$DEST/calibrate.txt" && cp "$DEST/calibrate.txt" "$RESULTS/"
rm -f "$DEST"/ref_*.bin
gzip -f "$DEST"/pred_*.jsonl 2>/dev/null
python3 scripts/rag2/eval_summary.py "$DEST" | tee "$RESULTS/summary.md"
kill "$packer_pid" 2>/dev/null
pack_results
ls -la "$DEST" "$RESULTS"
