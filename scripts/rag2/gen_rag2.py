#!/usr/bin/env python3
"""RAG tasks with real-text documents for the second RedKnot test model (scripts/rag2/README.md).

Pure stdlib, deterministic by seed.  Builds on scripts/rag/gen_data.py (the first model's generator:
the same four task families, the same prompt format, the same JSONL fields) and changes two things:

  * real distractor documents: a share of each prompt's distractor budget (--real-frac, eval default 0.5;
    training draws it per sample) is filled with real Wikipedia passages from ../shared/datasets
    (NQ-open gold passages as "title\\ntext", MuSiQue paragraphs cut at sentence ends into ~600-character
    pieces).  They are placed at random document boundaries (never between the two halves of a
    dependent diary pair);
  * real filler sentences: while a world is built, each filler sentence of its documents (biographies,
    company reports, travel notes, lab logs, diaries, essays) is, with probability --real-sent (0.5),
    a real sentence from those passages instead of a templated one, so the fact-carrying documents are
    real text with the generated facts in it.

Passages are split by a hash of their text: 15% "eval" (eval and calibration sets), 85% "train" (the
training stream), so no eval distractor or sentence is ever trained on.  Nothing from ../shared is
committed: the eval/calibration files are generated into the ignored .devcarry/ folder, and this command
regenerates them bit for bit (see scripts/rag2/prep.sh).

  python3 scripts/rag2/gen_rag2.py --tokens 8192 --per-task 200 --seed 28001 \\
      --tokenizer .devcarry/rag2/tokenizer/tokenizer.json --out .devcarry/rag2/eval/rag2-8k.jsonl.gz

With --tokenizer, every prompt is measured exactly (scripts/corpus/tok.js, Node) and non-gold segments
are dropped from the end until the prompt fits --tokens.
"""
import argparse
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "rag"))
import gen_data as G  # noqa: E402

TASKS = G.TASKS
SHARED = os.path.join(HERE, "..", "..", "..", "shared", "datasets")
DEFAULT_CPT = 3.9   # chars/token of the 16K BPE on these prompts, with margin (exact fit with --tokenizer)


# ------------------------------------------------------------------ passages
def _chunks(text, target=600):
    """Cut a long paragraph at sentence ends into pieces of about `target` characters."""
    sents = re.split(r"(?<=[.!?])\s+", text.strip())
    out, cur = [], ""
    for s in sents:
        if cur and len(cur) + len(s) > target:
            out.append(cur)
            cur = ""
        cur = (cur + " " + s).strip()
    if cur:
        out.append(cur)
    return [c for c in out if len(c) >= 120]


def load_passages(shared=SHARED, eval_frac=0.15):
    """-> {"train": [text...], "eval": [text...]}, deterministic, deduplicated."""
    seen, out = set(), {"train": [], "eval": []}
    if not os.path.exists(os.path.join(shared, "nq-open-oracle.jsonl.gz")):
        # The GPU machine has no ../shared: prep.sh's copies of the same lists travel instead.
        local = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.devcarry/rag2")
        for split in out:
            with gzip.open(os.path.join(local, f"passages-{split}.jsonl.gz"), "rt", encoding="utf-8") as f:
                out[split] = [json.loads(l)["text"] for l in f]
        return out

    def add(t):
        t = t.strip()
        h = hashlib.sha1(t.encode()).digest()
        if not t or h in seen:
            return
        seen.add(h)
        out["eval" if h[0] < int(256 * eval_frac) else "train"].append(t)

    with gzip.open(os.path.join(shared, "nq-open-oracle.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            for c in json.loads(line)["ctxs"]:
                add((c["title"] + "\n" if c.get("title") else "") + " ".join(c["text"].split()))
    with gzip.open(os.path.join(shared, "musique_s.json.gz"), "rt", encoding="utf-8") as f:
        for q in json.load(f):
            for c in q["ctxs"]:
                for ch in _chunks(" ".join(c["text"].split())):
                    add(ch)
    return out


def sentences(passages):
    out = []
    for p in passages:
        body = p.split("\n", 1)[-1]
        for s in re.split(r"(?<=[.!?])\s+", body):
            if 40 <= len(s) <= 260 and s[-1] in ".!?":
                out.append(s)
    return out


# ------------------------------------------------------------------ worlds with real filler sentences
_ORIG = {k: getattr(G, k) for k in ("_filler_general", "_filler_bio", "_filler_company", "_filler_lab")}


def make_world(seed, scale, sents, p_real, multihop_answer="bridge"):
    """G.World whose filler sentences are real sentences with probability p_real (the world's own rng
    decides, so the world is still a pure function of its seed)."""
    if not sents or p_real <= 0:
        return G.World(seed, scale, multihop_answer)

    def wrap(orig):
        def f(rng, *a, **k):
            if rng.random() < p_real:
                return sents[rng.randrange(len(sents))]
            return orig(rng, *a, **k)
        return f

    try:
        for k, fn in _ORIG.items():
            setattr(G, k, wrap(fn))
        return G.World(seed, scale, multihop_answer)
    finally:
        for k, fn in _ORIG.items():
            setattr(G, k, fn)


# ------------------------------------------------------------------ samples
def make_sample(world, task, budget, rng, passages, real_frac, doc_len, psg_len, q_len=None):
    """One sample: G.make_sample on the world with part of the budget, then real passages (indices into
    `passages`) in the rest, inserted at document boundaries that do not split a dependent pair.
    Returns dict(segments=[("w", doc) | ("p", idx)], question, answers, task, subtype, gold)."""
    world_budget = int(budget - real_frac * max(0, budget - 1 - G.QUESTION_RESERVE))
    s = G.make_sample(world, task, max(world_budget, G.QUESTION_RESERVE + 65), rng, doc_len=doc_len, q_len=q_len)
    qtok = 1 + (q_len(s["question"], s["answers"][0]) if q_len else G.QUESTION_RESERVE)
    segs = [("w", d) for d in s["segments"]]
    gold_set = set(s["gold"])
    gold_docs = [segs[i] for i in gold_set]
    total = qtok + sum(doc_len(d) for _, d in segs)
    added, fails = [], 0
    if passages:
        for _ in range(10000):
            i = rng.randrange(len(passages))
            L = psg_len(i)
            if total + L > budget:
                fails += 1
                if fails > 8:
                    break
                continue
            added.append(("p", i))
            total += L
    # insertion points: 0..len(segs), except right after a dependent pair's first half
    ok = [k for k in range(len(segs) + 1)
          if k == 0 or world.docs[segs[k - 1][1]]["kind"] != "diary_dep_a"]
    slots = sorted(rng.choice(ok) for _ in added)
    out, j = [], 0
    for k in range(len(segs) + 1):
        while j < len(slots) and slots[j] == k:
            out.append(added[j])
            j += 1
        if k < len(segs):
            out.append(segs[k])
    gold = [k for k, x in enumerate(out) if x in gold_docs]
    return dict(segments=out, question=s["question"], answers=s["answers"], task=task,
                subtype=s["subtype"], gold=gold)


def seg_text(world, passages, seg):
    return world.docs[seg[1]]["text"] if seg[0] == "w" else passages[seg[1]]


def to_json(world, passages, s, wid, split):
    out = dict(s)
    out["segments"] = [seg_text(world, passages, x) for x in s["segments"]]
    out["doc_ids"] = [f"{wid}:{x[1]}" if x[0] == "w" else f"psg-{split}:{x[1]}" for x in s["segments"]]
    return out


def generate(tokens, per_task, seed, split="eval", real_frac=0.5, real_sent=0.5, samples_per_world=25,
             cpt=DEFAULT_CPT, shared=SHARED, tasks=TASKS):
    passages = load_passages(shared)[split]
    sents = sentences(passages)
    est = lambda t: int((len(t) + 2) / cpt) + 1
    plen = [est(p) for p in passages]
    scale = max(1.0, tokens / 8192.0)
    order = [t for t in tasks for _ in range(per_task)]
    random.Random(f"order2-{seed}").shuffle(order)
    out, world, wid = [], None, None
    for k, task in enumerate(order):
        if k % samples_per_world == 0:
            wid = f"rag2-{seed}-w{k // samples_per_world}"
            world = make_world(wid, scale, sents, real_sent)
        rng = random.Random(f"rag2-{seed}-s{k}")
        s = make_sample(world, task, tokens, rng, passages, real_frac,
                        doc_len=lambda d: est(world.docs[d]["text"]), psg_len=lambda i: plen[i])
        j = to_json(world, passages, s, wid, split)
        j["id"] = f"rag2-{tokens}-{seed}-{k}"
        out.append(j)
    return out


# ------------------------------------------------------------------ exact fit (Node tokenizer)
def node_encode(tokenizer, texts):
    tool = os.path.join(HERE, "..", "corpus", "tok.js")
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
        name = f.name
    try:
        r = subprocess.run(["node", tool, "encode-lines", "--tokenizer", tokenizer, "--in", name],
                           capture_output=True, check=True)
    finally:
        os.unlink(name)
    return [json.loads(l) for l in r.stdout.decode().splitlines()]


def fit_exact(data, tokenizer, tokens):
    """Drop non-gold segments from the end until BOS + segments + question <= tokens; returns lengths."""
    texts = []
    for s in data:
        texts += [x + "\n\n" for x in s["segments"]]
        texts.append("Question: " + s["question"] + "\nAnswer:")
    lens = [len(x) for x in node_encode(tokenizer, texts)]
    p, out = 0, []
    for s in data:
        n = len(s["segments"])
        sl, ql = lens[p:p + n], lens[p + n]
        p += n + 1
        total = 1 + sum(sl) + ql
        while total > tokens:
            k = max(i for i in range(len(s["segments"])) if i not in s["gold"])
            total -= sl.pop(k)
            for key in ("segments", "doc_ids"):
                s[key].pop(k)
            s["gold"] = [g - 1 if g > k else g for g in s["gold"]]
        out.append(total)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--seed", type=int, default=28001, help="integer seeds only (training uses 'train2-*')")
    ap.add_argument("--split", default="eval", choices=["eval", "train"])
    ap.add_argument("--real-frac", type=float, default=0.5, help="share of the distractor budget in real passages")
    ap.add_argument("--real-sent", type=float, default=0.5, help="probability that a filler sentence is real")
    ap.add_argument("--cpt", type=float, default=DEFAULT_CPT)
    ap.add_argument("--shared", default=SHARED)
    ap.add_argument("--tokenizer", default="", help="tokenizer.json: fit every prompt exactly (needs node)")
    ap.add_argument("--calib-text", default="", help="also write a `redknot profile`/`calibrate` text file: "
                    "whole prompts with their answers, one per paragraph block")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    data = generate(a.tokens, a.per_task, a.seed, a.split, a.real_frac, a.real_sent, cpt=a.cpt, shared=a.shared)
    lens = fit_exact(data, a.tokenizer, a.tokens) if a.tokenizer else None
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    op = gzip.open if a.out.endswith(".gz") else open
    with op(a.out, "wt", encoding="utf-8") as f:
        for j in data:
            f.write(json.dumps(j, ensure_ascii=True) + "\n")
    if a.calib_text:
        with open(a.calib_text, "w", encoding="utf-8") as f:
            for s in data:
                f.write("".join(x + "\n\n" for x in s["segments"]) + "Question: " + s["question"]
                        + "\nAnswer: " + s["answers"][0] + "\n\n")
    msg = f"wrote {len(data)} samples to {a.out}"
    if lens:
        ls = sorted(lens)
        msg += f"; prompt tokens min {ls[0]} median {ls[len(ls) // 2]} max {ls[-1]}"
    nreal = sum(d.startswith("psg") for j in data for d in j["doc_ids"])
    nall = sum(len(j["doc_ids"]) for j in data)
    print(msg + f"; {nreal}/{nall} segments are real passages", file=sys.stderr)


if __name__ == "__main__":
    main()
