#!/usr/bin/env bash
# Restores the second test model (redknot-rag2, issue #24) from the repository's `model-redknot-rag2`
# branch (packed weights; scripts/rag2/README.md): byte-plane xz shards -> bf16 safetensors, plus
# config, tokenizer and model card, into models/redknot-rag2 (ignored) or DIR. The branch is kept out
# of main so that main's working tree stays small (it is carried to the GPU machine).
#   bash scripts/rag2/get-weights.sh [DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${1:-$ROOT/models/redknot-rag2}"
ref=""
for r in model-redknot-rag2 origin/model-redknot-rag2; do
  git -C "$ROOT" rev-parse -q --verify "$r^{commit}" >/dev/null && { ref="$r"; break; }
done
[ -n "$ref" ] || { echo "no branch model-redknot-rag2 in $ROOT (git fetch origin model-redknot-rag2)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git -C "$ROOT" archive "$ref" | tar -x -C "$tmp"
python3 "$ROOT/scripts/rag2/unpack.py" "$tmp" "$DEST"
echo "redknot-rag2 ($ref) -> $DEST"
