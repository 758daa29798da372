#!/usr/bin/env bash
# Load test: starts `redknot serve` on the shipped RAG model (127.0.0.1, a free port), runs the
# serving benchmark client for every reuse mode, prints the table and stops the server.
# Extra arguments go to the client (e.g. --requests 64 --concurrency 8).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
log="$(mktemp)"
"$root/build/redknot" serve --model "$root/models/redknot-rag-8k" --port 0 \
  >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do
  port=$(grep -oE '127\.0\.0\.1:[0-9]+' "$log" | head -1 | cut -d: -f2 || true)
  [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.2
done
[ -n "${port:-}" ] || { cat "$log"; exit 1; }
node "$root/scripts/bench-serve.mjs" --url "http://127.0.0.1:$port" --model redknot-rag-8k \
  --data "$root/data/eval/rag-4k.jsonl.gz" "$@"
