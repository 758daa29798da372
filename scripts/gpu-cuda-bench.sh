#!/usr/bin/env bash
# On the GPU machine, in one call: builds the CUDA backend and its tests (as gpu-op-parity.sh),
# runs op_parity_test and cuda_model_test, builds and runs bench/cuda_attention_bench.cu, then
# the torch peer (scripts/gpu-attn-peer.py) on the same card, and memcheck on the paged tests.
# Needs `carry: [".devdeps"]`. Logs go to $OUT when set.
# Usage: scripts/gpu-cuda-bench.sh [build-dir]
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${1:-$ROOT/build-gpu}"
LOG="${OUT:-/tmp}"
source "$ROOT/scripts/gpu-common.sh"
gpu_card_info
date -u
gpu_configure "$BUILD" "$LOG/cmake.log" || exit 1
gpu_build "$BUILD" "$LOG/build.log" op_parity_test cuda_model_test || exit 1
B="$BUILD/src"
nvcc -std=c++20 -O2 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I"$ROOT/src" \
  "$ROOT/bench/cuda_attention_bench.cu" -o "$BUILD/cuda_attention_bench" -Xlinker --start-group \
  "$B/librk_backend.a" "$B/librk_cuda.a" "$B/librk_core.a" -Xlinker --end-group \
  -lcublasLt -lcublas -lpthread 2>&1 | grep -v "^$" | head -20
status=0
echo "== op_parity_test"
"$B/op_parity_test" --gtest_brief=1 2>&1 | tee "$LOG/op_parity.log" | grep -E "parity \]|paged=dense|FAIL|PASSED|OK \]|rel err" | grep -v "^\[ parity \] cpu" | head -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== op_parity_test paged, 128-row prefill tiles (REDKNOT_FLASH_ROWS=128)"
REDKNOT_FLASH_ROWS=128 "$B/op_parity_test" --gtest_brief=1 --gtest_filter='*Paged*' > "$LOG/op_parity_rows128.log" 2>&1 || status=1
grep -E "cuda .*paged|cuda +prefill|PASSED|FAILED" "$LOG/op_parity_rows128.log" | head -12
echo "== cuda_model_test"
"$B/cuda_model_test" --gtest_brief=1 > "$LOG/model.log" 2>&1 || status=1
grep -E "PASSED|FAILED|Failure" "$LOG/model.log" | head -10
echo "== bench (RedKnot)"
"$BUILD/cuda_attention_bench" 2>&1 | tee "$LOG/bench.log" || status=1
echo "== peer (torch)"
PYTHONUNBUFFERED=1 python3 "$ROOT/scripts/gpu-attn-peer.py" 2>&1 | tee "$LOG/peer.log" || status=1
if command -v compute-sanitizer >/dev/null && [ "${MEMCHECK:-1}" = 1 ]; then
  echo "== compute-sanitizer memcheck: paged tests"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$B/op_parity_test" \
    --gtest_brief=1 --gtest_filter='*Paged*' > "$LOG/memcheck.log" 2>&1 || status=1
  tail -4 "$LOG/memcheck.log"
fi
echo "== tables"
grep -E "^\|" "$LOG/bench.log" | tail -12
grep -E "^\|" "$LOG/peer.log" | tail -12
echo "status $status"; date -u
exit $status
