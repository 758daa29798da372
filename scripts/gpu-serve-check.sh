#!/usr/bin/env bash
# On the GPU machine: `redknot serve --backend cuda` end to end on the shipped RAG model. The CLI
# is built here (scripts/pack-device-server.sh) and carried with the libraries it needs:
#   carry: ["build-srv-cuda/redknot", ".devlibs"]  (+ a CPU answers file, see CPU_ANSWERS)
# Starts the server on a free port, runs scripts/serve-check.py (full and redknot modes, alone and
# 8 at a time, bad requests, /health after them), prints /metrics, and compares the greedy answers
# with CPU_ANSWERS (serve-check.py --answers-out of a CPU server on the same samples) when given.
# Usage: [N=32] [CPU_ANSWERS=F] [SERVE_ARGS="--reuse-chunk 2048"] scripts/gpu-serve-check.sh
# (the CPU server that wrote CPU_ANSWERS must run with the same SERVE_ARGS).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/build-srv-cuda/redknot}"
LOG="${LOG_DIR:-${OUT:-/tmp}}"
mkdir -p "$LOG"
source "$ROOT/scripts/gpu-common.sh"
gpu_card_info
gpu_carried_cli "$BIN"
"$BIN" serve --backend cuda --model "$ROOT/models/redknot-rag-8k" --port 0 \
  --head-profile "$ROOT/models/redknot-rag-8k/head_profile.json" --sparse-ffn false \
  ${SERVE_ARGS:-} >"$LOG/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
port=""
for _ in $(seq 300); do
  port=$(grep -oE '127\.0\.0\.1:[0-9]+' "$LOG/serve.log" | head -1 | cut -d: -f2 || true)
  [ -n "$port" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.2
done
[ -n "$port" ] || { echo "server did not start:"; cat "$LOG/serve.log"; exit 1; }
head -3 "$LOG/serve.log"
status=0
python3 "$ROOT/scripts/serve-check.py" --url "http://127.0.0.1:$port" \
  --data "$ROOT/data/eval/rag-4k.jsonl.gz" --n "${N:-32}" --modes full,redknot --concurrency 8 \
  --label cuda --answers-out "$LOG/answers_cuda.json" || status=1
python3 - "$port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print("\n".join(l for l in text.splitlines() if l and not l.startswith("#"))[:3000])
PY
if [ -n "${CPU_ANSWERS:-}" ] && [ -f "$CPU_ANSWERS" ]; then
  python3 "$ROOT/scripts/serve-check.py" --compare "$CPU_ANSWERS" "$LOG/answers_cuda.json"
fi
kill -0 $pid 2>/dev/null || { echo "server died"; status=1; }
grep -iE "error|fatal" "$LOG/serve.log" | head -5
echo "status $status"
exit $status
