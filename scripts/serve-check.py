#!/usr/bin/env python3
"""End-to-end check of a running `redknot serve` (stdlib only, so it also runs on the GPU machine).

Sends the first N samples of a RAG eval set (documents + question, greedy, OpenAI chat API with
RedKnot's `documents` extension) once per reuse mode, sequentially and then C at a time, and
checks what a client relies on: every answer is well-formed, exact match against the answers,
the same answer concurrently as alone (batching must not change greedy output), bad requests
(malformed JSON, a wrong type, an unknown model, an oversized prompt) get a 4xx with an error
object, and the server still answers /health afterwards. Prints one table row per mode and
writes the answers as JSON (--answers-out) so two servers (e.g. --backend cpu and cuda) can be
compared with --compare A.json B.json.

Usage: serve-check.py --url http://127.0.0.1:PORT --data data/eval/rag-4k.jsonl.gz [--n 16]
         [--modes full,redknot] [--concurrency 8] [--answers-out F] [--label cuda]
       serve-check.py --compare A.json B.json
"""
import argparse
import concurrent.futures
import gzip
import json
import re
import string
import sys
import time
import urllib.error
import urllib.request


def normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def post(url, body, timeout=300):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.time() - t0
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return e.code, json.loads(payload), time.time() - t0
        except ValueError:
            return e.code, {"raw": payload.decode(errors="replace")}, time.time() - t0


def ask(base, model, sample, mode, max_tokens):
    body = {"model": model, "documents": sample["segments"], "reuse_mode": mode,
            "messages": [{"role": "user", "content": sample["question"]}],
            "max_tokens": max_tokens, "temperature": 0}
    code, out, dt = post(base + "/v1/chat/completions", body)
    if code != 200:
        raise RuntimeError(f"HTTP {code}: {out}")
    text = out["choices"][0]["message"]["content"]
    if not isinstance(text, str) or "usage" not in out:
        raise RuntimeError(f"malformed response: {out}")
    return text.strip(), dt


def check_bad_requests(base, model):
    """Each bad request must get a 4xx with an OpenAI-style error object."""
    failures = []
    long_doc = "word " * 200000  # far past the model's context
    cases = [
        ("malformed JSON", b'{"model": "x", "messages": ['),
        ("messages not an array", {"model": model, "messages": "hi"}),
        ("unknown model", {"model": "no-such-model",
                           "messages": [{"role": "user", "content": "hi"}]}),
        ("unknown reuse mode", {"model": model, "reuse_mode": "bogus",
                                "messages": [{"role": "user", "content": "hi"}]}),
        ("oversized prompt", {"model": model, "documents": [long_doc],
                              "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ]
    for name, body in cases:
        code, out, _dt = post(base + "/v1/chat/completions", body)
        ok = 400 <= code < 500 and isinstance(out, dict) and "error" in out
        print(f"  bad request: {name:24s} -> HTTP {code} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(name)
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        if r.status != 200:
            failures.append("health after bad requests")
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--model", default="redknot-rag-8k")
    ap.add_argument("--data")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--modes", default="full,redknot")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--answers-out")
    ap.add_argument("--label", default="")
    ap.add_argument("--compare", nargs=2)
    a = ap.parse_args()

    if a.compare:
        x, y = (json.load(open(f)) for f in a.compare)
        keys = sorted(set(x["answers"]) & set(y["answers"]))
        same = sum(x["answers"][k] == y["answers"][k] for k in keys)
        print(f"answers equal {x['label']} vs {y['label']}: {same} / {len(keys)}")
        for k in keys:
            if x["answers"][k] != y["answers"][k]:
                print(f"  {k}: {x['answers'][k]!r} vs {y['answers'][k]!r}")
        return 0

    opener = gzip.open if a.data.endswith(".gz") else open
    with opener(a.data, "rt") as f:
        samples = [json.loads(line) for _, line in zip(range(a.n), f)]
    failures = []
    answers = {}
    print(f"| server {a.label} | mode | n | EM | p50 latency s (alone) | wall s (x{a.concurrency}) "
          f"| answers/s (x{a.concurrency}) | concurrent == alone |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        alone, lat = [], []
        for s in samples:
            text, dt = ask(a.url, a.model, s, mode, a.max_tokens)
            alone.append(text)
            lat.append(dt)
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(a.concurrency) as ex:
            conc = list(ex.map(lambda s: ask(a.url, a.model, s, mode, a.max_tokens)[0], samples))
        wall = time.time() - t0
        em = sum(max(normalize(t) == normalize(ans) for ans in s["answers"])
                 for t, s in zip(alone, samples))
        same = sum(x == y for x, y in zip(alone, conc))
        if same != len(samples):
            failures.append(f"{mode}: {len(samples) - same} answers changed under concurrency")
        lat.sort()
        print(f"| {a.label} | {mode} | {len(samples)} | {100.0 * em / len(samples):.1f} | "
              f"{lat[len(lat) // 2]:.3f} | {wall:.2f} | {len(samples) / wall:.1f} | "
              f"{same}/{len(samples)} |")
        for i, t in enumerate(alone):
            answers[f"{mode}/{i}"] = t
    failures += check_bad_requests(a.url, a.model)
    if a.answers_out:
        json.dump({"label": a.label, "answers": answers}, open(a.answers_out, "w"), indent=1)
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("serve-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
