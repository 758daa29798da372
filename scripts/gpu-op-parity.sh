#!/usr/bin/env bash
# On the GPU machine (no OpenBLAS/gtest/nlohmann/PCRE2/utf8proc packages): configures a CUDA
# build that needs only the toolkit plus .devdeps/ (see pack-device-deps.sh), builds
# op_parity_test and runs it against every registered backend (cpu and cuda).
# Usage: scripts/gpu-op-parity.sh [build-dir]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${1:-$ROOT/build-gpu}"
DEPS="$ROOT/.devdeps"
[ -d "$DEPS/googletest" ] || { echo "no $DEPS/googletest: run scripts/pack-device-deps.sh and carry .devdeps" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DREDKNOT_CUDA=ON -DREDKNOT_OPENBLAS=OFF -DREDKNOT_TOKENIZER=OFF -DREDKNOT_NATIVE=OFF \
  -DREDKNOT_SERVER=OFF -DREDKNOT_BENCH=OFF \
  -DREDKNOT_GTEST_SOURCE_DIR="$DEPS/googletest" -DREDKNOT_JSON_INCLUDE_DIR="$DEPS" \
  -DREDKNOT_SHARED_DIR="$DEPS/shared"
cmake --build "$BUILD" --target op_parity_test cuda_model_test -j"$(nproc)"
status=0
"$BUILD/src/op_parity_test" || status=1
"$BUILD/src/cuda_model_test" || status=1
if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck: op_parity_test"
  compute-sanitizer --tool memcheck --error-exitcode 3 "$BUILD/src/op_parity_test" \
    --gtest_brief=1 || status=1
fi
exit $status
