#!/usr/bin/env bash
# On the GPU machine, in one call (issue 6, whole-model bars): builds bench/cuda_model_bench.cu
# (CMake target, CUDA backend, no Debian dev packages: needs `carry: [".devdeps"]`), runs it
# (dense prefill TTFT of the Llama-3-8B and Mistral-7B shapes at 8K and 32K tokens; sessions of
# 32K tokens that fit the device KV pool next to the Llama-3-8B weights, all-global vs
# head-aware; RedKnot reuse mode on 8 cached 4K documents + a 64-token query vs our full mode,
# --reuse none skips it), then the transformers peer (scripts/gpu-model-peer.py) on the same
# card, and prints both tables, the ours/peer ratio table and redknot vs the peer's full prefill
# (its T nearest the reuse prompt's, within 1%: 32768 for 32832). Each part runs even when another fails; the
# exit status is 1 when any failed. Logs go to $OUT when set.
# Usage: scripts/gpu-model-bench.sh [build-dir]
#   BENCH_ARGS / PEER_ARGS pass options through, e.g. a quick run:
#   BENCH_ARGS="--shapes llama3-8b --lengths 8192 --capacity none" \
#   PEER_ARGS="--shapes llama3-8b --lengths 8192" scripts/gpu-model-bench.sh
#   Shapes: llama3-8b, mistral-7b (the defaults), qwen3-32b, llama3.3-70b in both; the bench
#   also takes its other presets and the rest of src/loader/model_shapes.cc. At bf16 the 70B
#   weights (141 GB) fit no single card: pass the same --layers N to both.
# BUDGET_S (default 450) bounds the whole script: the bench and the peer get timeouts from what
# the build leaves (expected on an H100: build 1-3 min, bench ~1.5 min, peer ~1.5 min).
set -uo pipefail
SECONDS=0
BUDGET="${BUDGET_S:-450}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${1:-$ROOT/build-gpu}"
LOG="${OUT:-/tmp}"
source "$ROOT/scripts/gpu-common.sh"
gpu_card_info
date -u
status=0
BIN="$BUILD/bench/cuda_model_bench"
echo "== build (cuda_model_bench)"
if gpu_configure "$BUILD" "$LOG/model-cmake.log" &&
  gpu_build "$BUILD" "$LOG/model-build.log" cuda_model_bench; then
  echo "built in ${SECONDS}s"
else
  status=1
  rm -f "$BIN"  # never run a stale binary
fi
: >"$LOG/model-bench.log"
: >"$LOG/model-peer.log"
echo "== bench (RedKnot)"
if [ -x "$BIN" ]; then
  # Up to 55% of what is left, leaving the peer at least as much.
  left=$((BUDGET - SECONDS))
  to=$((left * 55 / 100))
  [ "$to" -ge 30 ] || to=30
  echo "timeout ${to}s"
  # shellcheck disable=SC2086
  timeout "$to" "$BIN" ${BENCH_ARGS:-} 2>&1 | tee "$LOG/model-bench.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { status=1; echo "bench exit $rc$([ "$rc" -eq 124 ] && echo " (timed out)")"; }
fi
echo "== peer (transformers)"
to=$((BUDGET - SECONDS - 10))
[ "$to" -ge 30 ] || to=30
echo "timeout ${to}s"
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 timeout "$to" python3 "$ROOT/scripts/gpu-model-peer.py" \
  ${PEER_ARGS:-} 2>&1 | tee "$LOG/model-peer.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { status=1; echo "peer exit $rc$([ "$rc" -eq 124 ] && echo " (timed out)")"; }
echo "== tables"
grep -E "^#" "$LOG/model-bench.log"
grep -E "^\||^capacity ratio|^reuse-row|^\(bar|^ERROR" "$LOG/model-bench.log"
grep -E "^#|^\||^ERROR|WARNING" "$LOG/model-peer.log"
python3 "$ROOT/scripts/gpu-model-peer.py" --combine "$LOG/model-bench.log" "$LOG/model-peer.log"
# RedKnot reuse mode vs the peer's full prefill of the same T (issue 6 bar: >= 3.5x).
python3 - "$LOG/model-bench.log" "$LOG/model-peer.log" <<'PY'
import re, sys
peer = {}
for line in open(sys.argv[2], errors="replace"):
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(c) == 5 and re.fullmatch(r"\d+", c[1]):
        peer[(c[0], int(c[1]))] = float(c[3])
rows = [dict(kv.split("=", 1) for kv in l.split()[1:])
        for l in open(sys.argv[1], errors="replace") if l.startswith("reuse-row ")]
if rows:
    print("\n## Reuse TTFT, RedKnot vs the peer's full prefill (bar: peer/redknot >= 3.5x)\n")
    print("| shape | T | redknot ms | redknot+sparse ms | peer T | peer full ms | peer/redknot | "
          "peer/(redknot+sparse) | bar |\n|---|---|---|---|---|---|---|---|---|")
for r in rows:
    T, rk, sp = int(r["T"]), float(r["redknot_ms"]), float(r["sparse_ms"])
    near = [t for (s, t) in peer if s == r["shape"] and abs(t - T) <= 0.01 * T]
    pt = min(near, key=lambda t: abs(t - T)) if near else None
    p = peer[(r["shape"], pt)] if near else None
    f = lambda v: f"{v:.1f}" if v > 0 else "n/a"
    x = lambda v: f"{p / v:.2f}x" if p and v > 0 else "n/a"
    best = max((p / v for v in (rk, sp) if v > 0), default=0) if p else 0
    bar = "n/a" if not p else ("met" if best >= 3.5 else "NOT met")
    print(f"| {r['shape']} | {T} | {f(rk)} | {f(sp)} | {pt or 'n/a'} | {f(p or 0)} | {x(rk)} | "
          f"{x(sp)} | {bar} |")
PY
echo "status $status"
date -u
exit $status
