#!/usr/bin/env bash
# On the GPU machine, in one call: builds the CUDA backend and its tests (as gpu-op-parity.sh),
# runs op_parity_test and cuda_model_test, builds and runs bench/cuda_attention_bench.cu, then
# the torch peer (scripts/gpu-attn-peer.py) on the same card, and memcheck on the paged op-parity
# and model tests. Needs `carry: [".devdeps"]`. Logs go to $LOG_DIR, else $OUT, else /tmp.
# Usage: [MEMCHECK=0] [NCU=1] [REDKNOT_BENCH_SM90=0,128x2] scripts/gpu-cuda-bench.sh [build-dir]
#   NCU=1: Nsight Compute sections for one launch of each prefill kernel;
#   REDKNOT_BENCH_SM90: which prefill kernels the bench times (default: all tile shapes).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${1:-$ROOT/build-gpu}"
LOG="${LOG_DIR:-${OUT:-/tmp}}"; mkdir -p "$LOG"
source "$ROOT/scripts/gpu-common.sh"
gpu_card_info
date -u
gpu_configure "$BUILD" "$LOG/cmake.log" || exit 1
gpu_build "$BUILD" "$LOG/build.log" op_parity_test cuda_model_test || exit 1
B="$BUILD/src"
nvcc -std=c++20 -O2 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I"$ROOT/src" \
  -I"$ROOT/.devdeps" \
  "$ROOT/bench/cuda_attention_bench.cu" -o "$BUILD/cuda_attention_bench" -Xlinker --start-group \
  "$B/librk_backend.a" "$B/librk_cuda.a" "$B/librk_core.a" -Xlinker --end-group \
  -lcublasLt -lcublas -lpthread 2>&1 | grep -v "^$" | head -20
status=0
echo "== op_parity_test"
"$B/op_parity_test" --gtest_brief=1 2>&1 | tee "$LOG/op_parity.log" | grep -E "parity \]|paged=dense|FAIL|PASSED|OK \]|rel err" | grep -v "^\[ parity \] cpu" | head -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
command -v cuobjdump >/dev/null && echo "HGMMA instructions in librk_cuda.a: $(cuobjdump -sass "$B/librk_cuda.a" | grep -c HGMMA)"
# The prefill kernel's other tile shapes (the default 128x2 ran above) and the mma.sync kernel.
for cfg in 64x4 64x3 0; do
  echo "== op_parity_test paged, REDKNOT_FLASH_SM90=$cfg"
  REDKNOT_FLASH_SM90=$cfg "$B/op_parity_test" --gtest_brief=1 --gtest_filter='*Paged*' > "$LOG/op_parity_$cfg.log" 2>&1 || status=1
  grep -E "rel err|PASSED|FAILED" "$LOG/op_parity_$cfg.log" | head -8
done
echo "== cuda_model_test"
"$B/cuda_model_test" --gtest_brief=1 > "$LOG/model.log" 2>&1 || status=1
grep -E "PASSED|FAILED|Failure" "$LOG/model.log" | head -10
echo "== bench (RedKnot)"
"$BUILD/cuda_attention_bench" 2>&1 | tee "$LOG/bench.log" || status=1
NCU_BIN="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
if [ "${NCU:-0}" = 1 ] && [ -n "$NCU_BIN" ]; then
  echo "== ncu: one 8K all-global prefill launch of the wgmma kernel and of the mma.sync kernel"
  for k in "128x2:paged_flash_sm90_kernel" "0:paged_flash_kernel"; do
    REDKNOT_BENCH_SM90="${k%%:*}" timeout 150 "$NCU_BIN" --kernel-name "regex:${k#*:}" --launch-skip 3 \
      --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
      "$BUILD/cuda_attention_bench" > "$LOG/ncu_${k%%:*}.log" 2>&1
    grep -vE "^\| (prefill|decode|matmul)|^==PROF==|^device|^allocator" "$LOG/ncu_${k%%:*}.log" | grep -E "[A-Za-z]" | head -90
  done
fi
echo "== peer (torch)"
PYTHONUNBUFFERED=1 python3 "$ROOT/scripts/gpu-attn-peer.py" 2>&1 | tee "$LOG/peer.log" || status=1
if command -v compute-sanitizer >/dev/null && [ "${MEMCHECK:-1}" = 1 ]; then
  echo "== compute-sanitizer memcheck: op_parity_test (paged), cuda_model_test"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$B/op_parity_test" \
    --gtest_brief=1 --gtest_filter='*Paged*' > "$LOG/memcheck.log" 2>&1 || status=1
  tail -4 "$LOG/memcheck.log"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$B/cuda_model_test" \
    --gtest_brief=1 > "$LOG/memcheck_model.log" 2>&1 || status=1
  tail -4 "$LOG/memcheck_model.log"
fi
echo "== tables"
grep -E "^\|" "$LOG/bench.log" | tail -12
grep -E "^\|" "$LOG/peer.log" | tail -12
echo "status $status"; date -u
exit $status
