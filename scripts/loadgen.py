#!/usr/bin/env python3
"""Open-loop RAG load generator for any OpenAI-compatible server (issue #20's serving benchmark).

Python stdlib only (asyncio over raw HTTP/1.1 sockets), so it runs here and on the GPU machine.

Requests are built from real passages (../shared/datasets: MuSiQue paragraphs and NQ-open
contexts, with their questions; or --passages FILE, a jsonl[.gz] of {"title","text"} / {"text"}
passages and {"question"} lines, as --export-passages writes it): passages are packed into
documents of about --doc-tokens tokens (measured with the server's /tokenize when it has one, else
~4 characters a token), a pool of --pool documents is drawn with Zipf popularity (--zipf), K
(--docs) distinct documents per request in random order, so most reuses are not at position 0.
Arrivals are Poisson at each rate of --rates (requests/s) for --duration-s (or --requests), with a
fixed --seed. Each request streams its answer (--max-tokens MIN-MAX, ignore_eos so that lengths
are as drawn); TTFT and TPOT come from the arrival times of the stream's chunks.

Per (mode, rate) it reports throughput (req/s, output tok/s), TTFT and TPOT p50/p90/p99, goodput
at the SLO (--slo-ttft-s, --slo-tpot-ms: completed requests meeting both, per second), errors, the
largest number of running requests and KV usage seen on /metrics, chunk-store hits by tier and
prefix-cache hits (/metrics deltas), and how late the client sent its arrivals (so a saturated
client shows rather than passes for a slow server). --out DIR writes report.json (after every
row) and latency-vs-rate PNGs (matplotlib when importable, else a built-in PNG writer).

A rate whose requests do not finish within --drain-s of the last arrival is recorded with its
unfinished requests (cancelled) and ends that mode's sweep: higher rates would only be further
past saturation. --deadline-s bounds the whole run: no arrival is sent after it, requests still
running then are cancelled, the rows so far are reported. --order rate runs every mode at one
rate before the next rate, so a deadline leaves light-load rows for every mode. Exit status 1
when a request failed (or no row ran), 2 on a usage error.

RedKnot extensions are used when --redknot (default on): documents go in `documents` (reuse
units) and each mode is sent as `reuse_mode`; with --redknot 0 the documents are put in the
user message and --modes names only labels (one server per mode, e.g. vLLM with and without
prefix caching).

  python3 scripts/loadgen.py --url http://127.0.0.1:8080 --model redknot-rag-8k --docs 8 \\
    --doc-tokens 512 --pool 32 --rates 0.5,1,2 --duration-s 60 --modes full,prefix,redknot --out /tmp/lg
  python3 scripts/loadgen.py --export-passages .devcarry/passages.jsonl.gz   # for hosts without ../shared
"""
import asyncio
import gzip
import json
import math
import os
import re
import ssl
import struct
import sys
import time
import urllib.parse
import zlib

DEFAULTS = {
    "url": "http://127.0.0.1:8080", "model": "", "shared": "../shared", "passages": "",
    "docs": "8", "doc-tokens": "4096", "pool": "64", "zipf": "1.1", "rates": "0.5,1,2",
    "duration-s": "60", "requests": "0", "max-tokens": "32-128", "modes": "full,prefix,redknot",
    "seed": "1", "slo-ttft-s": "2", "slo-tpot-ms": "50", "out": "", "redknot": "1",
    "api-key": "", "drain-s": "600", "warmup": "0", "deadline-s": "0", "order": "mode",
    "export-passages": "",
}


class UsageError(Exception):
    pass


def parse_args(argv):
    args = dict(DEFAULTS)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(__doc__)
            print("flags (defaults): " + ", ".join(f"--{k} {v!r}" for k, v in DEFAULTS.items()))
            sys.exit(0)
        if not a.startswith("--"):
            raise UsageError(f"unexpected argument {a}")
        key = a[2:]
        if key not in DEFAULTS:
            raise UsageError(f"unknown flag --{key} (known: {', '.join(DEFAULTS)})")
        if i + 1 >= len(argv):
            raise UsageError(f"--{key} needs a value")
        args[key] = argv[i + 1]
        i += 2
    if args["order"] not in ("mode", "rate"):
        raise UsageError("--order is mode or rate")
    return args


ARGS = dict(DEFAULTS)


def num(k):
    try:
        v = float(ARGS[k])
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UsageError(f"--{k} must be a number, got {ARGS[k]}")
    return v


def rng(seed):
    """Seeded PRNG (mulberry32, as the node version had): same seed, same documents and arrivals."""
    s = int(seed) & 0xFFFFFFFF

    def rand():
        nonlocal s
        s = (s + 0x6D2B79F5) & 0xFFFFFFFF
        t = s
        t = ((t ^ (t >> 15)) * (t | 1)) & 0xFFFFFFFF
        t ^= (t + ((t ^ (t >> 7)) * (t | 61))) & 0xFFFFFFFF
        return ((t ^ (t >> 14)) & 0xFFFFFFFF) / 4294967296

    return rand


# ---- workload ----
def passage_text(c):
    return f"{c['title']}\n{c['text'].strip()}" if c.get("title") else c["text"].strip()


def shared_records():
    """Passages and questions of ../shared/datasets, in the order the workload uses them."""
    d = os.path.join(ARGS["shared"], "datasets")
    with gzip.open(os.path.join(d, "musique_s.json.gz"), "rt") as f:
        mu = json.load(f)
    for q in mu:
        yield {"question": q["question"]}
        for c in q["ctxs"]:
            yield {"title": c.get("title") or "", "text": c["text"].strip()}
    with gzip.open(os.path.join(d, "nq-open-oracle.jsonl.gz"), "rt") as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            yield {"question": q["question"] if q["question"].endswith("?") else q["question"] + "?"}
            for c in q["ctxs"]:
                yield {"title": c.get("title") or "", "text": c["text"].strip()}


def file_records(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r, dict) or not ("text" in r or "question" in r):
                raise UsageError(f"{path}:{n}: expected an object with \"text\" or \"question\"")
            yield r


def load_passages():
    records = file_records(ARGS["passages"]) if ARGS["passages"] else shared_records()
    passages, questions = {}, []  # a dict keeps the first occurrence's order (dedup)
    for r in records:
        if "text" in r:
            passages.setdefault(passage_text(r), None)
        if "question" in r:
            questions.append(r["question"])
    if not questions:  # a passages-only file: one generic question (the answer is not scored)
        questions = ["Which of these documents is the most relevant, and why?"]
    return list(passages), questions


def export_passages(path):
    """Every passage and question of ../shared/datasets, so that --passages PATH builds the same
    documents as --shared does (any --pool, --doc-tokens, --seed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with (gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w")) as f:
        for r in shared_records():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    print(f"wrote {n} records to {path}")


# ---- HTTP (raw HTTP/1.1 over asyncio streams: one connection per request, Connection: close) ----
class HttpError(Exception):
    pass


URL = urllib.parse.urlsplit(DEFAULTS["url"])
HEADERS = {}


async def _open():
    port = URL.port or (443 if URL.scheme == "https" else 80)
    ctx = ssl.create_default_context() if URL.scheme == "https" else None
    return await asyncio.open_connection(URL.hostname, port, ssl=ctx, limit=1 << 22)


async def _body_parts(reader, headers):
    """Yields the response body as it arrives (chunked, Content-Length or until close)."""
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 1 << 20))
            if not data:
                raise HttpError("connection closed mid-body")
            left -= len(data)
            yield data
    else:
        while data := await reader.read(1 << 16):
            yield data


async def http(method, path, body=None):
    """Returns (status, headers, reader, writer) once the response head is in."""
    reader, writer = await _open()
    payload = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {URL.path.rstrip('/')}{path} HTTP/1.1", f"Host: {URL.netloc}",
            "Connection: close", f"Content-Length: {len(payload)}"]
    head += [f"{k}: {v}" for k, v in HEADERS.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    return status, headers, reader, writer


async def http_json(method, path, body=None):
    status, headers, reader, writer = await http(method, path, body)
    try:
        data = b"".join([p async for p in _body_parts(reader, headers)])
    finally:
        writer.close()
    return status, data


async def token_count(text):
    try:
        status, data = await http_json("POST", "/tokenize", {**model_field(), "prompt": text})
        if status == 200:
            return json.loads(data)["count"]
    except (OSError, ValueError, KeyError, HttpError, asyncio.IncompleteReadError):
        pass
    return math.ceil(len(text) / 4)  # servers without /tokenize


def model_field():
    return {"model": ARGS["model"]} if ARGS["model"] else {}


async def build_documents(passages, n, target, rand):
    """Documents of about `target` tokens: passages appended until the count reaches it."""
    keys = [rand() for _ in passages]
    order = sorted(range(len(passages)), key=keys.__getitem__)
    docs = []
    nxt, chars_per_token = 0, 4.0
    for _ in range(n):
        parts, length = [], 0
        while nxt < len(order) and length < target * chars_per_token:
            parts.append(passages[order[nxt]])
            length += len(parts[-1]) + 2
            nxt += 1
        if nxt >= len(order):
            raise UsageError(f"not enough passages for {n} documents of {target} tokens")
        text = "\n\n".join(parts)
        tokens = await token_count(text)
        chars_per_token = max(1.0, 0.7 * chars_per_token + 0.3 * (len(text) / max(1, tokens)))
        docs.append({"text": text, "tokens": tokens})
    return docs


def zipf_sampler(n, s, rand):
    """Zipf(s) over ranks 1..n: weights 1/r^s, drawn by inverse CDF."""
    cdf, total = [], 0.0
    for r in range(1, n + 1):
        total += 1 / r**s
        cdf.append(total)

    def pick():
        u = rand() * total
        lo, hi = 0, n - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if cdf[mid] < u:
                lo = mid + 1
            else:
                hi = mid
        return lo

    return pick


def make_requests(count, docs, questions, rand):
    min_out, max_out = (int(x) for x in ARGS["max-tokens"].split("-"))
    pick = zipf_sampler(len(docs), num("zipf"), rand)
    k = min(int(num("docs")), len(docs))
    out = []
    for _ in range(count):
        chosen = {}
        while len(chosen) < k:
            chosen.setdefault(pick(), None)
        keyed = [(rand(), d) for d in chosen]
        keyed.sort(key=lambda x: x[0])
        max_tokens = min_out + math.floor(rand() * (max_out - min_out + 1))
        out.append({"docs": [d for _, d in keyed],
                    "question": questions[math.floor(rand() * len(questions))],
                    "max_tokens": max_tokens})
    return out


# ---- running ----
METRICS = {
    "pool": ("redknot_chunk_store_hits_total", 'tier="pool"'),
    "host": ("redknot_chunk_store_hits_total", 'tier="host"'),
    "disk": ("redknot_chunk_store_hits_total", 'tier="disk"'),
    "misses": ("redknot_chunk_store_misses_total", None),
    "prefix_hits": ("vllm:prefix_cache_hits_total", None),
    "prefix_queries": ("vllm:prefix_cache_queries_total", None),
    "running": ("vllm:num_requests_running", None),
    "kv": ("vllm:kv_cache_usage_perc", None),
}
METRIC_RES = {name: re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
              for name, _ in METRICS.values()}


async def metrics():
    try:
        status, data = await http_json("GET", "/metrics")
    except (OSError, HttpError, asyncio.IncompleteReadError):
        return {}
    if status != 200:
        return {}
    text = data.decode(errors="replace")
    out = {}
    for key, (name, label) in METRICS.items():
        vals = [float(m.group(2)) for m in METRIC_RES[name].finditer(text)
                if not label or label in (m.group(1) or "")]
        out[key] = sum(vals) if vals else math.nan
    return out


async def run_one(req, docs, mode):
    documents = [docs[d]["text"] for d in req["docs"]]
    body = {**model_field(), "max_tokens": req["max_tokens"], "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if ARGS["redknot"] != "0":
        body["documents"] = documents
        body["messages"] = [{"role": "user", "content": req["question"]}]
        body["reuse_mode"] = mode
    else:
        body["messages"] = [{"role": "user",
                             "content": "\n\n".join(documents) + f"\n\nQuestion: {req['question']}"}]
    t0 = time.perf_counter()
    times, usage, error, writer = [], None, None, None
    try:
        status, headers, reader, writer = await http("POST", "/v1/chat/completions", body)
        if status != 200:
            text = b"".join([p async for p in _body_parts(reader, headers)])
            raise HttpError(f"HTTP {status}: {text[:200].decode(errors='replace')}")
        buf = b""
        async for part in _body_parts(reader, headers):
            now = time.perf_counter()  # the chunk's arrival time stamps its tokens
            buf += part
            while (nl := buf.find(b"\n\n")) >= 0:
                ev, buf = buf[:nl], buf[nl + 2:]
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                j = json.loads(ev[6:])
                if err := j.get("error"):
                    raise HttpError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                if j.get("usage"):
                    usage = j["usage"]
                ch = j.get("choices")
                if ch and (ch[0].get("delta") or {}).get("content"):
                    times.append(now)
    except (OSError, ValueError, HttpError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError) as e:
        error = f"{type(e).__name__}: {e}" if not isinstance(e, HttpError) else str(e)
    finally:
        if writer:
            writer.close()
    end = time.perf_counter()
    usage = usage or {}
    out_tokens = usage.get("completion_tokens") or len(times)
    return {
        "error": error,
        "ttft": times[0] - t0 if times else math.nan,
        "tpot": (end - times[0]) / (out_tokens - 1) if out_tokens > 1 and times else math.nan,
        "out_tokens": out_tokens, "prompt_tokens": usage.get("prompt_tokens") or 0,
        "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        "fallback": (usage.get("reuse") or {}).get("fallback"),
    }


def pct(xs, p):
    v = sorted(x for x in xs if math.isfinite(x))
    return v[min(len(v) - 1, math.floor(p / 100 * len(v)))] if v else math.nan


def pcts(xs):
    return {"p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99)}


async def run_rate(mode, rate, reqs, docs, rand, deadline):
    before = await metrics()
    peak = {"running": 0.0, "kv": 0.0}
    stop = asyncio.Event()

    async def sampler():
        while not stop.is_set():
            m = await metrics()
            for k in peak:
                if math.isfinite(m.get(k, math.nan)):
                    peak[k] = max(peak[k], m[k])
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    sampling = asyncio.create_task(sampler())
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tasks, lags, at, truncated = [], [], 0.0, False
    for req in reqs:
        at += -math.log(1 - rand()) / rate  # Poisson arrivals
        if deadline and t0 + at >= deadline:
            truncated = True
            break
        wait = t0 + at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        lags.append(max(0.0, time.perf_counter() - (t0 + at)) * 1e3)
        tasks.append(asyncio.create_task(run_one(req, docs, mode)))
    if not tasks and truncated:
        stop.set()
        await sampling
        return None  # not one arrival before the deadline
    drain = num("drain-s")
    if deadline:
        drain = max(0.0, min(drain, deadline - time.perf_counter()))
    done, pending = await asyncio.wait(tasks, timeout=drain) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stop.set()
    await sampling
    after = await metrics()
    truncated = truncated or bool(pending and deadline and time.perf_counter() >= deadline - 0.5)
    results = [t.result() for t in tasks if t in done]
    ok = [r for r in results if not r["error"]]
    slo_ttft, slo_tpot = num("slo-ttft-s"), num("slo-tpot-ms")
    good = [r for r in ok if r["ttft"] <= slo_ttft and not r["tpot"] * 1e3 > slo_tpot]

    def d(k):
        a, b = after.get(k, math.nan), before.get(k, math.nan)
        return a - b if math.isfinite(a) and math.isfinite(b) else None

    prompt = sum(r["prompt_tokens"] for r in ok)
    first_error = next((r["error"] for r in results if r["error"]), None)
    return {
        "mode": mode, "rate": rate, "requests": len(reqs), "sent": len(tasks),
        "completed": len(ok), "errors": len(results) - len(ok), "unfinished": len(pending),
        "drain_timeout": bool(pending) and not truncated, "truncated": truncated,
        "first_error": first_error, "fallbacks": sum(1 for r in ok if r["fallback"]),
        "wall_s": wall, "throughput_rps": len(ok) / wall,
        "output_tok_s": sum(r["out_tokens"] for r in ok) / wall,
        "goodput_rps": len(good) / wall,
        "ttft_s": pcts([r["ttft"] for r in ok]),
        "tpot_ms": pcts([r["tpot"] * 1e3 for r in ok]),
        "prompt_tokens_mean": prompt / len(ok) if ok else 0,
        "cached_fraction": sum(r["cached"] for r in ok) / prompt if prompt else 0,
        "chunk_hits": {k: d(k) for k in ("pool", "host", "disk", "misses")},
        "prefix_hits": d("prefix_hits"), "prefix_queries": d("prefix_queries"),
        "peak_running": peak["running"], "peak_kv_usage": peak["kv"],
        "client": {"arrival_lag_ms": pcts(lags), "cpu_share": cpu / wall if wall else 0},
    }


# ---- plots (latency vs rate) ----
COLORS = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (42, 161, 152), (181, 137, 0)]


def png(width, height, rgb):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = width * 3
    raw = b"".join(b"\0" + bytes(rgb[y * stride:(y + 1) * stride]) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def series(rows, modes, metric):
    for mi, mode in enumerate(modes):
        pts = sorted(((r["rate"], metric(r)) for r in rows
                      if r["mode"] == mode and math.isfinite(metric(r))), key=lambda p: p[0])
        yield mode, COLORS[mi % len(COLORS)], pts


def plot_builtin(rows, modes, metric, file, xmax, ymax):
    """No labels: the legend's colours are report.json's "plot_colors"; ticks every axis tenth."""
    W, H, L, B, T, R = 640, 400, 50, 40, 20, 20
    rgb = bytearray(b"\xff" * (W * H * 3))

    def put(x, y, c):
        x, y = round(x), round(y)
        if 0 <= x < W and 0 <= y < H:
            i = (y * W + x) * 3
            rgb[i:i + 3] = bytes(c)

    def line(x0, y0, x1, y1, c):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(int(n) + 1):
            put(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, c)

    def X(x):
        return L + x / xmax * (W - L - R)

    def Y(y):
        return H - B - y / ymax * (H - B - T)

    black = (0, 0, 0)
    line(L, H - B, W - R, H - B, black)
    line(L, T, L, H - B, black)
    for i in range(1, 11):
        line(X(xmax * i / 10), H - B, X(xmax * i / 10), H - B + 5, black)
        line(L - 5, Y(ymax * i / 10), L, Y(ymax * i / 10), black)
    for _, c, pts in series(rows, modes, metric):
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            for w in (-1, 0, 1):
                line(X(xa), Y(ya) + w, X(xb), Y(yb) + w, c)
        for x, y in pts:
            for dx in range(-3, 4):
                for dy in range(-3, 4):
                    put(X(x) + dx, Y(y) + dy, c)
    with open(file, "wb") as f:
        f.write(png(W, H, rgb))


def plot(rows, modes, metric, label, file):
    xs = [r["rate"] for r in rows]
    ys = [metric(r) for r in rows if math.isfinite(metric(r))]
    xmax = (max(xs) * 1.05 if xs else 0) or 1
    ymax = max(ys + [1e-9]) * 1.1
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plot_builtin(rows, modes, metric, file, xmax, ymax)
        return {"x_max": xmax, "y_max": ymax, "renderer": "builtin"}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for mode, c, pts in series(rows, modes, metric):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=[v / 255 for v in c],
                    label=mode)
    ax.set(xlim=(0, xmax), ylim=(0, ymax), xlabel="arrival rate (req/s)", ylabel=label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)
    return {"x_max": xmax, "y_max": ymax, "renderer": "matplotlib"}


def finite(x):
    """NaN and inf as null, as JSON (and the node version) has them."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def write_report(rows, modes, docs_info, plots):
    out = ARGS["out"]
    os.makedirs(out, exist_ok=True)
    report = {"args": ARGS, "documents": docs_info, "rows": rows,
              "plot_colors": {m: COLORS[i % len(COLORS)] for i, m in enumerate(modes)}}
    if plots:
        report["plot_axes"] = {
            name: plot(rows, modes, metric, label, os.path.join(out, f"{name}_vs_rate.png"))
            for name, metric, label in (
                ("ttft_p50", lambda r: r["ttft_s"]["p50"], "TTFT p50 (s)"),
                ("ttft_p99", lambda r: r["ttft_s"]["p99"], "TTFT p99 (s)"),
                ("tpot_p50", lambda r: r["tpot_ms"]["p50"], "TPOT p50 (ms)"),
                ("goodput", lambda r: r["goodput_rps"], "goodput (req/s)"))}
    tmp = os.path.join(out, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(finite(report), f, indent=1)
    os.replace(tmp, os.path.join(out, "report.json"))
    return report


# ---- main ----
def fmt(x, d=2):
    return f"{x:.{d}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def opt(x):
    return "-" if x is None else f"{x:g}"


def print_table(rows):
    print(f"\n| mode | rate req/s | done | err | unfinished | fallbacks | req/s | out tok/s | goodput req/s "
          f"(TTFT<={ARGS['slo-ttft-s']}s, TPOT<={ARGS['slo-tpot-ms']}ms) | TTFT p50/p90/p99 s | "
          "TPOT p50/p90/p99 ms | prompt tok | cached | chunk hits pool/host/disk, misses | prefix hits "
          "| peak running | peak KV | client lag p99 ms |")
    print("|---" * 18 + "|")
    for r in rows:
        ch, t, p = r["chunk_hits"], r["ttft_s"], r["tpot_ms"]
        print(f"| {r['mode']} | {r['rate']:g} | {r['completed']} | {r['errors']} | {r['unfinished']} | "
              f"{r['fallbacks']} | {fmt(r['throughput_rps'])} | {fmt(r['output_tok_s'], 1)} | "
              f"{fmt(r['goodput_rps'])} | {fmt(t['p50'])} / {fmt(t['p90'])} / {fmt(t['p99'])} | "
              f"{fmt(p['p50'], 1)} / {fmt(p['p90'], 1)} / {fmt(p['p99'], 1)} | "
              f"{fmt(r['prompt_tokens_mean'], 0)} | {fmt(100 * r['cached_fraction'], 1)}% | "
              f"{opt(ch['pool'])}/{opt(ch['host'])}/{opt(ch['disk'])}, {opt(ch['misses'])} | "
              f"{opt(r['prefix_hits'])} | {r['peak_running']:g} | {fmt(100 * r['peak_kv_usage'], 1)}% | "
              f"{fmt(r['client']['arrival_lag_ms']['p99'], 1)} |")


async def main():
    start = time.perf_counter()
    deadline = start + num("deadline-s") if num("deadline-s") > 0 else 0
    rates = [float(x) for x in ARGS["rates"].split(",")]
    modes = ARGS["modes"].split(",")
    seed = int(num("seed"))
    rand = rng(seed)
    passages, questions = load_passages()
    docs = await build_documents(passages, int(num("pool")), num("doc-tokens"), rand)
    mean_tokens = sum(d["tokens"] for d in docs) / len(docs)
    docs_info = {"count": len(docs), "mean_tokens": mean_tokens}
    print(f"# {len(docs)} documents of {mean_tokens:.0f} tokens on average (target {ARGS['doc-tokens']}), "
          f"{ARGS['docs']} per request, Zipf {ARGS['zipf']}; {len(passages)} passages, "
          f"{len(questions)} questions", flush=True)
    plan = [(m, ri) for m in modes for ri in range(len(rates))]
    if ARGS["order"] == "rate":
        plan = [(m, ri) for ri in range(len(rates)) for m in modes]
    rows, saturated, out_of_time = [], set(), False
    for mode, ri in plan:
        rate = rates[ri]
        if mode in saturated:
            print(f"# {mode} @ {rate:g} req/s: skipped (a lower rate did not drain)", flush=True)
            continue
        out_of_time = out_of_time or bool(deadline and time.perf_counter() >= deadline)
        if out_of_time:
            print(f"# {mode} @ {rate:g} req/s: skipped (--deadline-s reached)", flush=True)
            continue
        # One request stream per rate, the same for every mode (caches fill across runs of one
        # server: for clean comparisons run each mode against a fresh server, --modes one at a time).
        r2 = rng(seed * 7919 + 1 + ri * 104729)
        count = int(num("requests")) if num("requests") > 0 else max(1, round(rate * num("duration-s")))
        reqs = make_requests(count, docs, questions, r2)
        if num("warmup") > 0:
            await asyncio.gather(*(run_one(q, docs, mode) for q in reqs[:int(num("warmup"))]))
        row = await run_rate(mode, rate, reqs, docs, r2, deadline)
        if row is None:
            out_of_time = True
            print(f"# {mode} @ {rate:g} req/s: skipped (--deadline-s reached)", flush=True)
            continue
        rows.append(row)
        out_of_time = row["truncated"]  # its next arrival fell after the deadline
        if row["drain_timeout"]:
            saturated.add(mode)
        note = (" (truncated by --deadline-s)" if row["truncated"] else "") + (
            f" ({row['unfinished']} not done within --drain-s)" if row["drain_timeout"] else "")
        print(f"# {mode} @ {rate:g} req/s: {row['completed']}/{row['requests']} done, {row['errors']} errors"
              + (f" ({row['first_error']})" if row["first_error"] else "") + note
              + f"; client: arrival lag p99 {fmt(row['client']['arrival_lag_ms']['p99'], 1)} ms, "
              f"cpu {100 * row['client']['cpu_share']:.0f}%", flush=True)
        if ARGS["out"]:
            write_report(rows, modes, docs_info, plots=False)
    print_table(rows)
    if ARGS["out"]:
        report = write_report(rows, modes, docs_info, plots=True)
        print(f"\nwrote {ARGS['out']}/report.json and 4 PNGs (colours: {json.dumps(report['plot_colors'])})")
    return 0 if rows and not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    try:
        ARGS.update(parse_args(sys.argv[1:]))
        if ARGS["export-passages"]:
            export_passages(ARGS["export-passages"])
            sys.exit(0)
        URL = urllib.parse.urlsplit(ARGS["url"])
        if URL.scheme not in ("http", "https") or not URL.hostname:
            raise UsageError(f"--url must be http(s)://host[:port], got {ARGS['url']}")
        HEADERS["Content-Type"] = "application/json"
        if ARGS["api-key"]:
            HEADERS["Authorization"] = f"Bearer {ARGS['api-key']}"
        sys.exit(asyncio.run(main()))
    except (UsageError, OSError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        sys.exit(2)
