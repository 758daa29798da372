#!/usr/bin/env bash
# Restores the second test model's weights (redknot-rag2, issue #24): the repository keeps them as
# byte-plane xz shards in models/redknot-rag2/packed/ (37 MB instead of 55 MB of bf16; stdlib Python
# only), this writes the bf16 safetensors shards next to the model's config, tokenizer and settings
# (ignored by git), or copies the whole folder to DIR. Bit-exact (unpack.py). SRC: another folder of
# that layout (default: the repository's models/redknot-rag2).
#   bash scripts/rag2/get-weights.sh [DIR [SRC]]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SRC="$(cd "${2:-$ROOT/models/redknot-rag2}" && pwd)"
DEST="${1:-$SRC}"
[ -d "$SRC/packed" ] || { echo "no $SRC/packed in this checkout" >&2; exit 1; }
if [ "$DEST" != "$SRC" ]; then
  mkdir -p "$DEST"
  find "$SRC" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$DEST/" \;
fi
python3 "$ROOT/scripts/rag2/unpack.py" "$SRC/packed" "$DEST" >/dev/null
echo "redknot-rag2 -> $DEST ($(ls "$DEST"/*.safetensors | wc -l) shards)"
