#!/usr/bin/env bash
# Copies the header-only / source-only test dependencies that the GPU machine lacks (it has no
# Debian dev packages) into .devdeps/, so that `run` can carry them there:
#   .devdeps/googletest  <- /usr/src/googletest   (-DREDKNOT_GTEST_SOURCE_DIR)
#   .devdeps/nlohmann    <- /usr/include/nlohmann (-DREDKNOT_JSON_INCLUDE_DIR=.devdeps)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.devdeps"
for src in /usr/src/googletest /usr/include/nlohmann; do
  [ -d "$src" ] || { echo "missing $src (run scripts/install-deps.sh)" >&2; exit 1; }
done
rm -rf "$DEST"
mkdir -p "$DEST"
cp -r /usr/src/googletest "$DEST/googletest"
cp -r /usr/include/nlohmann "$DEST/nlohmann"
mkdir -p "$DEST/xxhash"
cp /usr/include/xxhash.h /usr/lib/x86_64-linux-gnu/libxxhash.a "$DEST/xxhash/"
# The oracle vectors, so that model tests can run there (REDKNOT_SHARED_DIR=.devdeps/shared).
SHARED="$ROOT/../shared"
if [ -d "$SHARED/refs" ]; then
  mkdir -p "$DEST/shared"
  cp -r "$SHARED/refs" "$DEST/shared/refs"
fi
du -sh "$DEST"
