#!/usr/bin/env bash
# Builds the full CLI (server, tokenizer, CUDA backend; portable, no -march=native; built-in CPU
# kernels, as OpenBLAS would not fit the 64 MiB carry) and op_parity_test here, where the Debian dev
# packages are, into build-srv-cuda/, and copies the shared libraries they need that the GPU
# machine lacks (cpp-httplib, PCRE2, utf8proc, OpenSSL, ...) into .devlibs/, so that `run` can
# carry them: ["build-srv-cuda/redknot", "build-srv-cuda/src/op_parity_test", ".devlibs"] for
# scripts/gpu-serve-check.sh; scripts/gpu-serve-sweep.sh carries the first and the last.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="$ROOT/build-srv-cuda"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DREDKNOT_CUDA=ON -DREDKNOT_NATIVE=OFF -DREDKNOT_OPENBLAS=OFF \
  -DREDKNOT_TESTS=ON >/dev/null
cmake --build "$BUILD" --target redknot_cli op_parity_test -j"$(nproc)"
DEST="$ROOT/.devlibs"
rm -rf "$DEST"
mkdir -p "$DEST"
# Everything but the C runtime, the compiler runtime and CUDA (the GPU machine has its own).
ldd "$BUILD/redknot" | awk '/=> \//{print $3}' |
  grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas[^/]*)\.so' |
  while read -r lib; do cp -L "$lib" "$DEST/"; done
ls "$DEST"
du -sh "$DEST" "$BUILD/redknot"
