#!/usr/bin/env bash
# Regenerates models/redknot-rag-8k/head_profile.json: calibration text from the data generator
# (seed 777, never used for training or evaluation), then `redknot profile`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tmp="$(mktemp -d)"
python3 "$root/scripts/rag/gen_data.py" --tokens 2048 --per-task 2 --seed 777 --out "$tmp/calib.jsonl" >/dev/null
python3 - "$tmp/calib.jsonl" "$tmp/calib.txt" <<'PY'
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        out.write("\n\n".join(json.loads(line)["segments"]) + "\n\n")
PY
"$root/build/redknot" profile --model "$root/models/redknot-rag-8k" --calib "$tmp/calib.txt" \
  --out "$root/models/redknot-rag-8k/head_profile.json" --ratio 0.15 --window 512 --sink 4 \
  --max-tokens 2048
rm -rf "$tmp"
