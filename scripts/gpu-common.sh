# shellcheck shell=bash
# Sourced by the GPU-machine scripts (gpu-cuda-bench.sh, gpu-model-bench.sh): the card, and the
# CUDA build configured without the Debian dev packages (the toolkit plus .devdeps/, made here by
# scripts/pack-device-deps.sh and carried by `run`). Needs ROOT set to the repository root.

gpu_card_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader || true
}

# gpu_configure BUILD_DIR LOG_FILE: configures the CUDA build; prints the log tail on failure.
gpu_configure() {
  local build="$1" log="$2" deps="$ROOT/.devdeps" gen=()
  [ -d "$deps/googletest" ] || echo "warning: no $deps/googletest: run scripts/pack-device-deps.sh and carry .devdeps" >&2
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$ROOT" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DREDKNOT_CUDA=ON -DREDKNOT_OPENBLAS=OFF -DREDKNOT_TOKENIZER=OFF -DREDKNOT_NATIVE=OFF \
    -DREDKNOT_SERVER=OFF -DREDKNOT_BENCH=OFF \
    -DREDKNOT_GTEST_SOURCE_DIR="$deps/googletest" -DREDKNOT_JSON_INCLUDE_DIR="$deps" \
    -DREDKNOT_SHARED_DIR="$deps/shared" >"$log" 2>&1 || { tail -30 "$log"; return 1; }
}

# gpu_build BUILD_DIR LOG_FILE TARGET...: builds the targets; prints the errors on failure.
gpu_build() {
  local build="$1" log="$2"
  shift 2
  cmake --build "$build" --target "$@" -j"$(nproc)" >"$log" 2>&1 \
    || { grep -E "error|FAILED" "$log" | head -40; return 1; }
}

# gpu_carried_cli BIN: the CLI built here by scripts/pack-device-server.sh and carried with its
# libraries (.devlibs/): puts them on the library path; exits when BIN was not carried.
gpu_carried_cli() {
  export LD_LIBRARY_PATH="$ROOT/.devlibs:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [ -x "$1" ] || { echo "no $1: run scripts/pack-device-server.sh here and carry it" >&2; exit 1; }
}
