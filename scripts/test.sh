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
  cmake -S "$root" -B "$root/build-asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DREDKNOT_SANITIZE=ON >/dev/null
  cmake --build "$root/build-asan" -j"$jobs"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$root/build-asan" -j"$jobs" --output-on-failure
fi
