#!/usr/bin/env bash
# On the GPU machine, in one call (issue #19's decode bar, issue #21's FP8 speed bar): op parity of
# every CUDA op against the reference backend (the skinny decode GEMMs among them) and its
# compute-sanitizer memcheck, then bench/cuda_model_bench on the Llama-3-8B shape in one process:
# decode steps at 4K context for each batch with the skinny GEMMs on and off (the cuBLASLt
# baseline), in bf16 and FP8 weights, with the bytes each step reads over the card's copy
# bandwidth (and a stage profile of one eager step); dense prefill TTFT at 8K / 32K, bf16 against
# FP8 weights; and RedKnot reuse TTFT with the deep profile (8 x 4K documents) against our full
# prefill, with its stage profile.
# The binaries are built on the development machine and carried as one archive:
#   bash scripts/pack-device-server.sh && cmake --build build-srv-cuda --target cuda_model_bench
#   tar -cJf .devcarry/decode-bin.tar.xz build-srv-cuda/redknot build-srv-cuda/src/op_parity_test \
#     build-srv-cuda/bench/cuda_model_bench .devlibs
#   run (carry .devcarry/decode-bin.tar.xz): bash scripts/gpu-decode-bench.sh
# Then, with REDKNOT_GEMM_FP8_OUTER=1 (cuBLASLt applies the FP8 scale vectors; FP8_OUTER=0 skips it),
# the FP8 op parity again and the FP8 TTFT rows, to compare with the bench's.
# BENCH_ARGS replaces the bench's arguments; MEMCHECK=0 skips the sanitizer. Logs go to $OUT.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LOG="${OUT:-/tmp}"
mkdir -p "$LOG"
[ -f .devcarry/decode-bin.tar.xz ] && tar -xJf .devcarry/decode-bin.tar.xz
source scripts/gpu-common.sh
gpu_card_info
date -u
gpu_carried_cli build-srv-cuda/redknot
status=0
PARITY='OpParityTest.EveryBackendMatchesReference:OpParityTest.Fp8OpsMatchReference'
echo "== op_parity_test (every op; matmul / matmul_fp8 lines shown)"
timeout 240 build-srv-cuda/src/op_parity_test --gtest_brief=1 --gtest_filter="$PARITY" \
  >"$LOG/op_parity.log" 2>&1 || status=1
grep -E "parity \] cuda.*matmul|FAILED|PASSED|Failure" "$LOG/op_parity.log" | head -40
echo "== cuda_model_bench"
# shellcheck disable=SC2086
timeout "${BENCH_S:-420}" build-srv-cuda/bench/cuda_model_bench ${BENCH_ARGS:---shapes llama3-8b \
  --lengths 8192,32768 --chunks 4096 --warmup 1 --reps 3 --capacity none --reuse none \
  --decode llama3-8b --decode-batch 1,4,16,64 --decode-context 4096 --decode-steps 32 \
  --skinny-rows 8,0 --quantization none,fp8 --reuse llama3-8b --reuse-profile deep --stage-profile 1} >"$LOG/bench.log" 2>&1 || status=1
grep -E "^#|^\||ERROR|FAILED" "$LOG/bench.log"
if [ "${FP8_OUTER:-1}" = 1 ]; then
  # The FP8 GEMM with cuBLASLt's outer-vector scales (off by default until this passes and pays).
  echo "== REDKNOT_GEMM_FP8_OUTER=1: op parity (FP8 ops) and FP8 TTFT at 8K / 32K"
  REDKNOT_GEMM_FP8_OUTER=1 timeout 120 build-srv-cuda/src/op_parity_test --gtest_brief=1 \
    --gtest_filter='OpParityTest.Fp8OpsMatchReference' >"$LOG/op_parity_fp8_outer.log" 2>&1 || status=1
  grep -E "parity \] cuda.*matmul_fp8|FAILED|PASSED|Failure" "$LOG/op_parity_fp8_outer.log" | head -10
  REDKNOT_GEMM_FP8_OUTER=1 timeout 240 build-srv-cuda/bench/cuda_model_bench --shapes llama3-8b \
    --lengths 8192,32768 --chunks 4096 --warmup 1 --reps 3 --capacity none --reuse none \
    --decode none --quantization fp8 >"$LOG/bench_fp8_outer.log" 2>&1 || status=1
  grep -E "^\| llama|ERROR|FAILED" "$LOG/bench_fp8_outer.log"
fi
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
if [ "${MEMCHECK:-1}" = 1 ] && [ -n "$SAN" ]; then
  echo "== compute-sanitizer memcheck: op_parity_test $PARITY"
  timeout 240 "$SAN" --tool memcheck --error-exitcode 3 build-srv-cuda/src/op_parity_test \
    --gtest_brief=1 --gtest_filter="$PARITY" >"$LOG/memcheck.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY|PASSED|FAILED" "$LOG/memcheck.log" | head -5
fi
exit $status
