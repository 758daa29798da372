#!/usr/bin/env python3
"""Agreement-only evaluation prompts from ../shared/datasets (issue #24): real documents and real
questions that the small test models cannot answer, so what is measured is how closely each reuse
mode follows full prefill (first-token agreement, logits cosine), not EM. Writes `redknot eval`
JSONL (segments = reuse units, question, answers, task):

  nq-<T>.jsonl.gz       NQ-open: the gold passage at a random position among other questions' gold
                        passages, filled to about T tokens
  musique.jsonl.gz      MuSiQue: the 10 Wikipedia passages of each question, as given
  kvr.jsonl.gz          KV retrieval: the 75 "key": "value" pairs cut into segments of 8 pairs

  python3 scripts/rag2/agreement_sets.py --out DIR [--tokens 4096 8192] [--n 200] [--seed 31001]

Token counts are estimated at 3.7 characters per token (the eval prompt is tokenized by the model;
prompts a little over T are fine for models trained to 8K+). Deterministic from the seed.
Not committed: the text is ../shared data (read-only test data, never copied into the repo).
"""
import argparse
import gzip
import json
import os
import random

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "datasets")


def read_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def passage(ctx):
    return (ctx.get("title", "") + "\n" + ctx["text"]).strip()


def write(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} prompts, median {sorted(sum(len(s) for s in r['segments']) for r in rows)[len(rows) // 2] // 4} tokens (est.)")


def nq_sets(shared, tokens, n, rng):
    rows = read_jsonl(os.path.join(shared, "nq-open-oracle.jsonl.gz"))
    golds = [passage(r["ctxs"][0]) for r in rows]
    out = []
    for i in range(n):
        q = rows[i]
        docs = [golds[i]]
        budget = int(tokens * 3.7) - len(golds[i]) - len(q["question"]) - 64
        while budget > 0:
            j = rng.randrange(len(rows))
            if j == i:
                continue
            docs.append(golds[j])
            budget -= len(golds[j])
        docs.pop()  # the last one crossed the budget
        pos = rng.randrange(len(docs))
        docs[0], docs[pos] = docs[pos], docs[0]
        out.append({"segments": docs, "question": q["question"], "answers": q["answers"], "task": "nq",
                    "id": f"nq-{tokens}-{i}"})
    return out


def musique_set(shared):
    with gzip.open(os.path.join(shared, "musique_s.json.gz"), "rt", encoding="utf-8") as f:
        data = json.load(f)
    return [{"segments": [passage(c) for c in d["ctxs"]], "question": d["question"], "answers": d["answers"],
             "task": "musique", "id": f"musique-{i}"} for i, d in enumerate(data)]


def kvr_set(shared, n):
    rows = read_jsonl(os.path.join(shared, "kv-retrieval-75_keys.jsonl.gz"))
    out = []
    for i, r in enumerate(rows[:n]):
        pairs = [f'"{k}": "{v}"' for k, v in r["ordered_kv_records"]]
        key = r["key"]
        segs = [",\n".join(pairs[k:k + 8]) for k in range(0, len(pairs), 8)]
        out.append({"segments": segs, "question": f'What is the value of key "{key}"?', "answers": [r["value"]],
                    "task": "kvr", "id": f"kvr-{i}"})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shared", default=SHARED)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=31001)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for t in a.tokens:
        write(os.path.join(a.out, f"nq-{t}.jsonl.gz"), nq_sets(a.shared, t, a.n, random.Random(a.seed + t)))
    write(os.path.join(a.out, "kvr.jsonl.gz"), kvr_set(a.shared, a.n))
    write(os.path.join(a.out, "musique.jsonl.gz"), musique_set(a.shared))


if __name__ == "__main__":
    main()
