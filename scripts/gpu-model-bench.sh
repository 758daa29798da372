#!/usr/bin/env bash
# On the GPU machine, in one call (issue 6, whole-model bars): builds bench/cuda_model_bench.cu
# (CMake target, CUDA backend, no Debian dev packages: needs `carry: [".devdeps"]`), runs it
# (dense prefill TTFT of the Llama-3-8B and Mistral-7B shapes at 8K and 32K tokens; sessions of
# 32K tokens that fit the device KV pool next to the Llama-3-8B weights, all-global vs
# head-aware), then the transformers peer (scripts/gpu-model-peer.py) on the same card, and
# prints both tables and the ours/peer ratio table. Each part runs even when another fails; the
# exit status is 1 when any failed. Logs go to $OUT when set.
# Usage: scripts/gpu-model-bench.sh [build-dir]
#   BENCH_ARGS / PEER_ARGS pass options through, e.g. a quick run:
#   BENCH_ARGS="--shapes llama3-8b --lengths 8192 --capacity none" \
#   PEER_ARGS="--shapes llama3-8b --lengths 8192" scripts/gpu-model-bench.sh
# BUDGET_S (default 450) bounds the whole script: the bench and the peer get timeouts from what
# the build leaves (expected on an H100: build 1-3 min, bench ~1.5 min, peer ~1.5 min).
set -uo pipefail
SECONDS=0
BUDGET="${BUDGET_S:-450}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${1:-$ROOT/build-gpu}"
LOG="${OUT:-/tmp}"
source "$ROOT/scripts/gpu-common.sh"
gpu_card_info
date -u
status=0
BIN="$BUILD/bench/cuda_model_bench"
echo "== build (cuda_model_bench)"
if gpu_configure "$BUILD" "$LOG/model-cmake.log" &&
  gpu_build "$BUILD" "$LOG/model-build.log" cuda_model_bench; then
  echo "built in ${SECONDS}s"
else
  status=1
  rm -f "$BIN"  # never run a stale binary
fi
: >"$LOG/model-bench.log"
: >"$LOG/model-peer.log"
echo "== bench (RedKnot)"
if [ -x "$BIN" ]; then
  # Up to 55% of what is left, leaving the peer at least as much.
  left=$((BUDGET - SECONDS))
  to=$((left * 55 / 100))
  [ "$to" -ge 30 ] || to=30
  echo "timeout ${to}s"
  # shellcheck disable=SC2086
  timeout "$to" "$BIN" ${BENCH_ARGS:-} 2>&1 | tee "$LOG/model-bench.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { status=1; echo "bench exit $rc$([ "$rc" -eq 124 ] && echo " (timed out)")"; }
fi
echo "== peer (transformers)"
to=$((BUDGET - SECONDS - 10))
[ "$to" -ge 30 ] || to=30
echo "timeout ${to}s"
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 timeout "$to" python3 "$ROOT/scripts/gpu-model-peer.py" \
  ${PEER_ARGS:-} 2>&1 | tee "$LOG/model-peer.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { status=1; echo "peer exit $rc$([ "$rc" -eq 124 ] && echo " (timed out)")"; }
echo "== tables"
grep -E "^#" "$LOG/model-bench.log"
grep -E "^\||^capacity ratio|^ERROR" "$LOG/model-bench.log"
grep -E "^#|^\||^ERROR|WARNING" "$LOG/model-peer.log"
python3 "$ROOT/scripts/gpu-model-peer.py" --combine "$LOG/model-bench.log" "$LOG/model-peer.log"
echo "status $status"
date -u
exit $status
