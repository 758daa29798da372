#!/usr/bin/env bash
# On the GPU machine, in one call (issue #20): the open-loop serving sweep of `redknot serve
# --backend cuda` at a real model shape, redknot against full prefill and prefix caching.
#   carry: ["build-srv-cuda/redknot", ".devlibs", ".devcarry/tokenizers/llama3",
#           ".devcarry/passages.jsonl.gz"]
# (scripts/pack-device-server.sh builds the first two; the passages come from
# `python3 scripts/loadgen.py --export-passages .devcarry/passages.jsonl.gz`; without them
# ../shared/datasets is read, which the GPU machine does not have.)
#  1. `redknot init-model`: a model directory of --config's shape with seeded random weights on
#     the machine's local disk (--model-root, /var/tmp); a later call on the same (warm) machine
#     reuses it when its redknot_init.json names the same config, seed and layers.
#  2. `redknot make-profile`: a head profile at --layout (deep: every global head in the last
#     quarter of the layers), --global-ratio 0.15, --window 512, --sink 4.
#  3. `redknot serve` on them; one short request per mode (a document outside the pool) warms it.
#  4. scripts/loadgen.py: --modes at each of --rates, 32K prompts by default (8 x 4K documents
#     from a pool of 64, Zipf 1.1), --order rate so that a deadline still leaves the light-load
#     rows of every mode; a rate that does not drain within --drain-s ends its mode.
#  5. the summary table (mode x rate), issue #20's goodput and TTFT ratios, and /metrics.
# Everything ends by --deadline seconds after the start (default 560, inside one 600 s call):
# each phase gets what is left, and the rows measured so far are always printed. Logs, report.json
# and the PNGs go to $OUT (or /tmp/serve-sweep).
# Exit status 1 when a phase failed or a request errored.
#
# A CPU dry run of the whole path (tiny shape; the built CLI here):
#   BIN=build/redknot scripts/gpu-serve-sweep.sh --backend cpu --config test-llama3 \
#     --tokenizer ../shared/tokenizers/llama3 --docs 2 --doc-tokens 128 --pool 8 --rates 1,2 \
#     --duration-s 4 --max-tokens 4-8 --max-num-seqs 16 --deadline 240
set -uo pipefail
SECONDS=0
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/build-srv-cuda/redknot}"
OUTDIR="${OUT:-/tmp/serve-sweep}"

# shellcheck disable=SC2054  # commas inside values (rates, modes)
declare -A opt=(
  [config]=llama3.1-8b [layers]=0 [seed]=0 [tokenizer]="$ROOT/.devcarry/tokenizers/llama3"
  [model-root]=/var/tmp/redknot-models [layout]=deep [global-ratio]=0.15 [window]=512 [sink]=4
  [backend]=cuda [gpu-mem]=0.9 [max-num-seqs]=256 [serve-args]=""
  [passages]="$ROOT/.devcarry/passages.jsonl.gz" [docs]=8 [doc-tokens]=4096 [pool]=64 [zipf]=1.1
  [rates]=0.25,0.5,1,2,4 [duration-s]=20 [drain-s]=20 [max-tokens]=32-128 [modes]=full,prefix,redknot
  [slo-ttft-s]=2 [slo-tpot-ms]=50 [loadgen-args]="" [deadline]=560
)
while [ $# -gt 0 ]; do
  key="${1#--}"
  if [ "$key" = "$1" ] || [ -z "${opt[$key]+x}" ] || [ $# -lt 2 ]; then
    echo "usage: $0 [--KEY VALUE]...; keys (defaults):" >&2
    for k in "${!opt[@]}"; do echo "  --$k '${opt[$k]}'" >&2; done
    exit 2
  fi
  opt[$key]="$2"
  shift 2
done
DEADLINE="${opt[deadline]}"
left() { echo $((DEADLINE - SECONDS)); }
mkdir -p "$OUTDIR"
source "$ROOT/scripts/gpu-common.sh"
[ "${opt[backend]}" = cuda ] && gpu_card_info
gpu_carried_cli "$BIN"
date -u
status=0

name="${opt[config]}"
[ "${opt[layers]}" != 0 ] && name+="-L${opt[layers]}"
MODEL="${opt[model-root]}/$name-seed${opt[seed]}"
echo "== model $MODEL"
# redknot_init.json is written last: a directory that has it is whole.
if python3 - "$MODEL/redknot_init.json" "${opt[config]}" "${opt[seed]}" "${opt[layers]}" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(1)
sys.exit(0 if (j["config"], j["seed"], j.get("layers_override", 0)) ==
         (sys.argv[2], int(sys.argv[3]), int(sys.argv[4])) else 1)
PY
then
  echo "reusing it (written by an earlier call)"
else
  [ -f "${opt[tokenizer]}/tokenizer.json" ] ||
    { echo "no ${opt[tokenizer]}/tokenizer.json: carry the llama3 tokenizer (--tokenizer DIR)"; exit 1; }
  mkdir -p "${opt[model-root]}"
  df -h "${opt[model-root]}" | tail -1
  layers=()
  [ "${opt[layers]}" != 0 ] && layers=(--layers "${opt[layers]}")
  # Progress lines only every 2 s; the time left bounds it (rm: never reuse half a directory).
  timeout "$(left)" "$BIN" init-model --config "${opt[config]}" --tokenizer "${opt[tokenizer]}" \
    --out "$MODEL" --seed "${opt[seed]}" "${layers[@]}" --force 2>&1 | tail -4
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "init-model failed"; rm -rf "$MODEL"; exit 1; }
fi
echo "model ready at ${SECONDS}s"

echo "== head profile (${opt[layout]})"
PROFILE="$OUTDIR/head_profile_${opt[layout]}.json"
"$BIN" make-profile --model "$MODEL" --layout "${opt[layout]}" --global-ratio "${opt[global-ratio]}" \
  --window "${opt[window]}" --sink "${opt[sink]}" --out "$PROFILE" --quiet || exit 1

echo "== serve (${opt[backend]})"
serve=(serve --backend "${opt[backend]}" --model "$MODEL" --served-model-name "$name" --port 0
       --head-profile "$PROFILE" --max-num-seqs "${opt[max-num-seqs]}" --disable-log-requests)
[ "${opt[backend]}" = cuda ] && serve+=(--gpu-memory-fraction "${opt[gpu-mem]}")
# shellcheck disable=SC2206
serve+=(${opt[serve-args]})
echo "redknot ${serve[*]}"
"$BIN" "${serve[@]}" --print-config
"$BIN" "${serve[@]}" >"$OUTDIR/serve.log" 2>&1 &
pid=$!
# shellcheck disable=SC2317  # called by the trap
stop_server() {
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}
trap stop_server EXIT
port=""
while [ "$(left)" -gt 30 ]; do
  port=$(grep -oE '127\.0\.0\.1:[0-9]+' "$OUTDIR/serve.log" | head -1 | cut -d: -f2)
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
[ -n "$port" ] || { echo "server did not start:"; tail -20 "$OUTDIR/serve.log"; exit 1; }
URL="http://127.0.0.1:$port"
head -3 "$OUTDIR/serve.log"
echo "server up at ${SECONDS}s"

# One request per mode outside the measured workload: the first use of each path (kernels,
# graphs, the chunk store) is not timed in the first row.
python3 - "$URL" "$name" "${opt[modes]}" <<'PY' || status=1
import json, sys, time, urllib.request
url, model, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
doc = " ".join(f"Warm-up sentence {i} says nothing the workload asks about." for i in range(200))
for mode in modes:
    body = {"model": model, "documents": [doc], "reuse_mode": mode, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Warm up?"}], "ignore_eos": True}
    t0 = time.time()
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        usage = json.loads(r.read())["usage"]
    print(f"warm-up {mode}: {time.time() - t0:.2f} s, {usage['prompt_tokens']} prompt tokens")
PY

echo "== loadgen (at ${SECONDS}s, $(left)s left)"
passages=(--shared "$ROOT/../shared")
[ -f "${opt[passages]}" ] && passages=(--passages "${opt[passages]}")
# Leaves 25 s for the summary, /metrics and stopping the server; timeout is the backstop.
budget=$(($(left) - 25))
[ "$budget" -gt 10 ] || budget=10
# shellcheck disable=SC2086
timeout "$((budget + 15))" python3 "$ROOT/scripts/loadgen.py" --url "$URL" --model "$name" \
  "${passages[@]}" --docs "${opt[docs]}" --doc-tokens "${opt[doc-tokens]}" --pool "${opt[pool]}" \
  --zipf "${opt[zipf]}" --rates "${opt[rates]}" --duration-s "${opt[duration-s]}" \
  --drain-s "${opt[drain-s]}" --max-tokens "${opt[max-tokens]}" --modes "${opt[modes]}" \
  --slo-ttft-s "${opt[slo-ttft-s]}" --slo-tpot-ms "${opt[slo-tpot-ms]}" --order rate \
  --deadline-s "$budget" --out "$OUTDIR/loadgen" ${opt[loadgen-args]} 2>&1 |
  tee "$OUTDIR/loadgen.log" | grep -E '^#|^wrote|loadgen:|Traceback|Error'
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { status=1; echo "loadgen exit $rc$([ "$rc" -eq 124 ] && echo " (timed out)")"; }

echo "== summary (${opt[config]}, ${opt[layout]} profile, ${opt[docs]} x ${opt[doc-tokens]}-token documents)"
python3 - "$OUTDIR/loadgen/report.json" <<'PY' || status=1
import json, sys
try:
    rep = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(print("no report.json: no row finished"))
a, rows = rep["args"], rep["rows"]
f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
print(f"documents: {rep['documents']['count']} of {rep['documents']['mean_tokens']:.0f} tokens on average; "
      f"SLO TTFT <= {a['slo-ttft-s']} s, TPOT <= {a['slo-tpot-ms']} ms\n")
print("| mode | rate | done/sent | req/s | goodput req/s | TTFT p50 / p90 s | TPOT p50 ms | peak running "
      "| peak KV | cached | prompt tok | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    note = ("deadline" if r["truncated"] else "") + (f"{r['unfinished']} not drained" if r["drain_timeout"] else "") \
        + (f" {r['errors']} errors" if r["errors"] else "") + (f" {r['fallbacks']} fallbacks" if r["fallbacks"] else "")
    print(f"| {r['mode']} | {r['rate']:g} | {r['completed']}/{r['sent']} | {f(r['throughput_rps'])} | "
          f"{f(r['goodput_rps'])} | {f(r['ttft_s']['p50'])} / {f(r['ttft_s']['p90'])} | {f(r['tpot_ms']['p50'], 1)} | "
          f"{r['peak_running']:g} | {100 * r['peak_kv_usage']:.1f}% | {100 * r['cached_fraction']:.1f}% | "
          f"{r['prompt_tokens_mean']:.0f} | {note.strip()} |")
by = {}
for r in rows:
    by.setdefault(r["mode"], {})[r["rate"]] = r
best = {m: max(x["goodput_rps"] for x in v.values()) for m, v in by.items()}
print("\nbest goodput (req/s): " + ", ".join(f"{m} {g:.2f}" for m, g in best.items()))
rk = best.get("redknot")
for base, bar in (("full", 4), ("prefix", 2)):
    if rk is not None and base in best:
        ratio = f"{rk / best[base]:.2f}x" if best[base] > 0 else f"n/a ({base} met the SLO nowhere)"
        print(f"goodput redknot / {base}: {ratio} (issue #20 bar at 32K: >= {bar}x)")
common = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
if common and "redknot" in by and "full" in by:
    lo = common[0]
    t_full, t_rk = by["full"][lo]["ttft_s"]["p50"], by["redknot"][lo]["ttft_s"]["p50"]
    if t_full and t_rk:
        print(f"TTFT p50 at {lo:g} req/s: full {t_full:.3f} s, redknot {t_rk:.3f} s: {t_full / t_rk:.2f}x "
              "(bar: >= 3x at 32K, >= 4x at 128K)")
print("peak running (sessions held under this load): " +
      ", ".join(f"{m} {max(x['peak_running'] for x in v.values()):g}" for m, v in by.items()))
lags = [r["client"]["arrival_lag_ms"]["p99"] for r in rows if r["client"]["arrival_lag_ms"]["p99"] is not None]
if lags:
    print(f"client arrival lag p99 at most {max(lags):.1f} ms (the client kept its schedule when small)")
PY

echo "== /metrics"
python3 - "$URL" <<'PY'
import sys, urllib.request
try:
    text = urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=10).read().decode()
except OSError as e:
    sys.exit(print(f"no /metrics: {e}"))
# Not the histogram buckets, per-route counts or the remote tier (no Redis here).
skip = ("#", "redknot_requests_total{", "redknot_chunk_store_remote_", "redknot_kv_handovers_total")
keep = [l for l in text.splitlines() if l and not l.startswith(skip) and "_bucket{" not in l]
print("\n".join(keep)[:5000])
PY
kill -0 "$pid" 2>/dev/null || { echo "server died"; status=1; }
grep -iE "error|fatal" "$OUTDIR/serve.log" | head -5
echo "status $status at ${SECONDS}s"
date -u
exit $status
