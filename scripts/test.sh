#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite: first the Release build, then
# the same tests under AddressSanitizer + UndefinedBehaviorSanitizer. Test data: ../shared.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/install-deps.sh"
jobs="$(nproc)"

echo "== Release build and tests"
cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$root/build" -j"$jobs"
ctest --test-dir "$root/build" -j"$jobs" --output-on-failure

if [ "${REDKNOT_SKIP_SANITIZERS:-0}" != "1" ]; then
  echo "== ASan/UBSan build and tests"
  cmake -S "$root" -B "$root/build-asan" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DREDKNOT_SANITIZE=ON >/dev/null
  cmake --build "$root/build-asan" -j"$jobs"
  # Every test except the long numeric parity sweeps and the shipped model's serving and
  # calibration runs, which run the same code paths as the tests here and take 10x longer under
  # ASan (they ran in the Release pass above; calibration's search, plot and PNG unit tests run),
  # and the load generator's test (Python: nothing of it is built).
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$root/build-asan" -j"$jobs" --output-on-failure \
      -E '^(refs_parity_test|paged_parity_test|mixed_profile_test|rag_model_test|serving_reuse_test|calibrate_cli_test|loadgen_test)$'
  # One model of the parity sweep still runs under the sanitizers, whole and chunked; and the
  # scheduler's reuse paths on the tiny model (the shipped model's 8K runs are timing tests).
  "$root/build-asan/src/refs_parity_test" --gtest_filter='*qwen3_tiny_cpu*' --gtest_brief=1
  "$root/build-asan/src/serving_reuse_test" --gtest_filter='ReuseFallbacks.*' --gtest_brief=1
fi
