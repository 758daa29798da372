set -uo pipefail
ROOT=$PWD; source scripts/gpu-common.sh; SECONDS=0
gpu_configure build-gpu $OUT/cmake.log || exit 1
gpu_build build-gpu $OUT/build.log op_parity_test cuda_model_test cuda_model_bench || exit 1
echo "built ${SECONDS}s"
B=build-gpu/src
$B/op_parity_test --gtest_brief=1 > $OUT/op_parity.log 2>&1; echo "op_parity rc=$?"
$B/cuda_model_test --gtest_brief=1 > $OUT/model.log 2>&1; echo "cuda_model_test rc=$?"; grep -E "FAILED|PASSED" $OUT/model.log | head -3
echo "== model bench t=${SECONDS}"
BUDGET_S=330 BENCH_ARGS="--shapes llama3-8b,mistral-7b --lengths 8192,32768 --chunks 4096 --capacity none --reuse llama3-8b --reuse-profile front --stage-profile 1 --decode llama3-8b,rag-7m --decode-batch 1,16 --decode-context 4096 --decode-steps 32" PEER_ARGS="--shapes llama3-8b,mistral-7b --lengths 8192,32768" bash scripts/gpu-model-bench.sh > $OUT/front.log 2>&1; echo "front rc=$?"
grep -E "^stages|^  [a-z(]|^\|" $OUT/front.log | tail -42
echo "== spread t=${SECONDS}"
timeout 150 build-gpu/bench/cuda_model_bench --shapes llama3-8b --lengths 8192 --chunks 4096 --capacity none --reuse llama3-8b --reuse-profile spread --stage-profile 1 > $OUT/spread.log 2>&1; echo "spread rc=$?"
grep -E "^stages llama3-8b redknot\+|^  [a-z(]|^\|" $OUT/spread.log | tail -18
echo "== serve t=${SECONDS}"
N=32 CPU_ANSWERS=build-srv-cuda/answers_cpu.json LOG_DIR=$OUT/serve timeout 200 bash scripts/gpu-serve-check.sh > $OUT/serve.txt 2>&1; echo "serve rc=$?"
grep -E "^\||answers equal|status|bad request|checks" $OUT/serve.txt | head -20
cd $OUT && tar czf logs.tgz *.log serve.txt serve && rm -rf *.log serve
echo "t=${SECONDS}"
