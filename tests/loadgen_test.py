#!/usr/bin/env python3
"""scripts/loadgen.py against a stub OpenAI server (stdlib asyncio; a few seconds, no model).

The stub answers /tokenize (4 characters a token), /metrics (running requests, KV usage, chunk
hits) and streaming chat completions with a fixed time to first token and time per token, over
chunked SSE as `redknot serve` and vLLM send it. At 250 req/s with 1.2 s streams the client holds
~300 streams at once: the test checks the report (fields, counts, latencies near the stub's,
PNGs, seeded determinism of the workload) and that the client kept its arrival schedule, i.e.
that it is not the bottleneck. Also: --passages, the deadline, and a drain timeout ending a mode.
"""
import asyncio
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
LOADGEN = os.path.join(HERE, "..", "scripts", "loadgen.py")
TTFT_S, TPOT_S = 0.2, 0.02


class Stub:
    def __init__(self):
        self.running = 0
        self.peak = 0
        self.hits = 0
        self.bodies = []

    async def handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path, _ = head.split("\r\n")[0].split(" ")
            length = next((int(l.split(":")[1]) for l in head.split("\r\n")
                           if l.lower().startswith("content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == "/tokenize":
                await self.reply(writer, {"count": len(body["prompt"]) // 4})
            elif path == "/metrics":
                text = (f"vllm:num_requests_running {self.running}\n"
                        f"vllm:kv_cache_usage_perc {min(1, self.running / 1000)}\n"
                        f'redknot_chunk_store_hits_total{{tier="pool"}} {self.hits}\n'
                        'redknot_chunk_store_hits_total{tier="host"} 0\n')
                await self.reply(writer, text.encode(), "text/plain")
            elif path == "/v1/chat/completions":
                await self.stream(writer, body)
            else:
                await self.reply(writer, {"error": {"message": "no route"}}, status=404)
        finally:
            writer.close()

    async def reply(self, writer, body, ctype="application/json", status=200):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()

    async def stream(self, writer, body):
        self.bodies.append(body)
        if body.get("reuse_mode") == "slow":  # never finishes: the drain timeout's case
            await asyncio.sleep(3600)
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.hits += len(body.get("documents", []))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")

        def chunk(obj):
            ev = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))

        try:
            await asyncio.sleep(TTFT_S)
            n = body["max_tokens"]
            for i in range(n):
                chunk({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]})
                await writer.drain()
                if i + 1 < n:
                    await asyncio.sleep(TPOT_S)
            prompt = sum(len(d) for d in body.get("documents", [])) // 4
            chunk({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                            "prompt_tokens_details": {"cached_tokens": prompt // 2}}})
            chunk(b"[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.running -= 1


def serve(stub):
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(stub.handle, "127.0.0.1", 0, backlog=4096))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return server.sockets[0].getsockname()[1]


def loadgen(port, out, *extra):
    cmd = [sys.executable, LOADGEN, "--url", f"http://127.0.0.1:{port}", "--model", "stub",
           "--passages", os.path.join(out, "passages.jsonl.gz"), "--out", out, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print(r.stdout[-3000:], r.stderr[-3000:])
    return r


def main():
    stub = Stub()
    port = serve(stub)
    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        with gzip.open(os.path.join(tmp, "passages.jsonl.gz"), "wt") as f:
            for i in range(400):
                f.write(json.dumps({"title": f"Doc {i}", "text": f"passage {i} " + "word " * 80}) + "\n")
            f.write(json.dumps({"text": "untitled passage " + "word " * 80}) + "\n")
            for i in range(20):
                f.write(json.dumps({"question": f"question {i}?"}) + "\n")

        # 1. Many concurrent streams: 250 req/s, 1.2 s each -> ~300 at once.
        out = os.path.join(tmp, "a")
        os.makedirs(out)
        os.link(os.path.join(tmp, "passages.jsonl.gz"), os.path.join(out, "passages.jsonl.gz"))
        r = loadgen(port, out, "--docs", "4", "--doc-tokens", "256", "--pool", "32", "--rates",
                    "20,250", "--duration-s", "1.5", "--max-tokens", "50-50", "--modes", "full,redknot",
                    "--order", "rate")
        check(r.returncode == 0, f"loadgen exit 0 (got {r.returncode})")
        rep = json.load(open(os.path.join(out, "report.json")))
        rows = rep["rows"]
        check([(x["mode"], x["rate"]) for x in rows] ==
              [("full", 20), ("redknot", 20), ("full", 250), ("redknot", 250)], "--order rate")
        check(rep["documents"]["count"] == 32 and rep["documents"]["mean_tokens"] >= 256,
              "32 documents of >= 256 tokens")
        for x in rows:
            tag = f"{x['mode']}@{x['rate']}"
            check(x["completed"] == x["requests"] == round(x["rate"] * 1.5) and x["errors"] == 0,
                  f"{tag}: all {x['requests']} done, no errors")
            check(abs(x["ttft_s"]["p50"] - TTFT_S) < 0.1, f"{tag}: TTFT p50 {x['ttft_s']['p50']:.3f} ~ {TTFT_S}")
            check(abs(x["tpot_ms"]["p50"] - TPOT_S * 1e3) < 8,
                  f"{tag}: TPOT p50 {x['tpot_ms']['p50']:.1f} ms ~ {TPOT_S * 1e3}")
            check(x["client"]["arrival_lag_ms"]["p99"] < 100,
                  f"{tag}: arrivals on time (lag p99 {x['client']['arrival_lag_ms']['p99']:.1f} ms)")
            check(x["goodput_rps"] > 0 and abs(x["cached_fraction"] - 0.5) < 0.01, f"{tag}: goodput, cached share")
            check(x["chunk_hits"]["pool"] == 4 * x["requests"] and x["chunk_hits"]["host"] == 0,
                  f"{tag}: chunk hits from /metrics deltas")
        check(max(x["peak_running"] for x in rows) >= 200, f"peak running {max(x['peak_running'] for x in rows)} >= 200")
        check(stub.peak >= 250, f"stub saw {stub.peak} concurrent streams")
        for name in ("ttft_p50", "ttft_p99", "tpot_p50", "goodput"):
            with open(os.path.join(out, f"{name}_vs_rate.png"), "rb") as f:
                check(f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name}_vs_rate.png is a PNG")
        sent = [b for b in stub.bodies if b.get("reuse_mode") == "full"]
        same = [b for b in stub.bodies if b.get("reuse_mode") == "redknot"]
        check([b["documents"] for b in sent] == [b["documents"] for b in same] and
              all(len(b["documents"]) == 4 and b["ignore_eos"] and b["stream"] for b in sent),
              "every mode gets the same seeded request stream")

        # 2. A mode that does not drain is cut at --drain-s and skips its higher rates; --deadline-s
        # ends the run with the rows so far.
        out = os.path.join(tmp, "b")
        os.makedirs(out)
        os.link(os.path.join(tmp, "passages.jsonl.gz"), os.path.join(out, "passages.jsonl.gz"))
        r = loadgen(port, out, "--docs", "2", "--doc-tokens", "128", "--pool", "8", "--rates", "5,10,20",
                    "--requests", "4", "--max-tokens", "4-8", "--modes", "slow,full", "--drain-s", "1")
        rows = json.load(open(os.path.join(out, "report.json")))["rows"]
        slow = [x for x in rows if x["mode"] == "slow"]
        check(len(slow) == 1 and slow[0]["unfinished"] == 4 and slow[0]["drain_timeout"],
              "a rate that does not drain is recorded and ends its mode")
        check(any(x["mode"] == "full" and x["completed"] == 4 for x in rows), "the next mode still runs")
        check("skipped (a lower rate did not drain)" in r.stdout, "skipped rates are reported")
        r = loadgen(port, out, "--docs", "2", "--doc-tokens", "128", "--pool", "8", "--rates", "5,10",
                    "--requests", "4", "--modes", "slow", "--deadline-s", "2")
        rows = json.load(open(os.path.join(out, "report.json")))["rows"]
        check(len(rows) == 1 and rows[0]["truncated"] and rows[0]["unfinished"] == 4
              and not rows[0]["drain_timeout"], "--deadline-s cuts the running rate")
        check("skipped (--deadline-s reached)" in r.stdout, "and skips the rest")
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
