#!/usr/bin/env bash
# Installs the build and test dependencies of RedKnot from Debian apt (and the npm test client).
# Idempotent: skips apt when every package is already present.
set -euo pipefail
PKGS=(build-essential cmake ninja-build pkg-config
      libopenblas-dev libpcre2-dev nlohmann-json3-dev libcpp-httplib-dev libcli11-dev
      libutf8proc-dev libxxhash-dev zlib1g-dev libgtest-dev libgmock-dev libbenchmark-dev clang-format
      libhiredis-dev redis-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The openai npm client of the server e2e suite (tests/server), from the committed lock file.
# Skipped when npm is absent (ctest then reports that suite as skipped).
root="$(cd "$(dirname "$0")/.." && pwd)"
if command -v npm >/dev/null 2>&1 && [ ! -d "$root/tests/server/node_modules/openai" ]; then
  npm ci --no-audit --no-fund --prefix "$root/tests/server"
fi
