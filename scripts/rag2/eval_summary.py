#!/usr/bin/env python3
"""Summaries of `redknot eval --json` reports (scripts/rag2/gpu-eval.sh).

  python3 scripts/rag2/eval_summary.py --line FILE   # a report in a line (as a mode finishes)
  python3 scripts/rag2/eval_summary.py DIR           # eval_<set>__<mode>.json in DIR: a table per set
"""
import collections
import glob
import json
import os
import sys


def cells(r):
    """The fields both summaries show, formatted."""
    n = f"{r['n']} of {r['n_requested']}" if r.get("truncated") else str(r["n"])
    return {"n": n, "em": f"{100 * r['em']:.1f}", "top1": f"{r['top1_match']:.3f}",
            "cos": f"{r['logits_cos']:.4f}", "saved": f"{100 * r['flops_reduction']:.1f}%",
            "ttft": f"{r['ttft_ms_p50']:.1f}",
            "tasks": {t: f"{100 * v['em']:.1f}" for t, v in sorted(r.get("tasks", {}).items())}}


def line(path):
    """A line per report (`eval --mode a,b --json` writes an array of them)."""
    reports = json.load(open(path))
    out = []
    for r in reports if isinstance(reports, list) else [reports]:
        c = cells(r)
        tasks = " ".join(f"{t} {v}" for t, v in c["tasks"].items())
        out.append(f"{r['mode'] + ': ' if isinstance(reports, list) else ''}n {c['n']} EM {c['em']} "
                   f"top-1 {c['top1']} cos {c['cos']} saved {c['saved']} TTFT p50 {c['ttft']} ms tasks {tasks}")
    return "\n".join(out)


def tables(folder):
    by_set = collections.defaultdict(list)  # grouped by set, in run order
    for p in sorted(glob.glob(os.path.join(folder, "eval_*__*.json")), key=os.path.getmtime):
        try:
            r = json.load(open(p))
        except Exception as e:
            print(p, "unreadable:", e)
            continue
        by_set[os.path.basename(p)[5:-5].rsplit("__", 1)[0]].append((r["mode"], cells(r)))
    for name, rows in by_set.items():
        tasks = sorted({t for _, c in rows for t in c["tasks"]})
        print(f"\n{name}\n| mode | n | EM | top-1 | logits cos | FLOPs saved | TTFT p50 ms | " +
              " | ".join(f"EM {t}" for t in tasks) + " |")
        for mode, c in rows:
            print(f"| {mode} | {c['n']} | {c['em']} | {c['top1']} | {c['cos']} | {c['saved']} | {c['ttft']} | " +
                  " | ".join(c["tasks"].get(t, "-") for t in tasks) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--line":
        print(line(sys.argv[2]))
    elif len(sys.argv) == 2:
        tables(sys.argv[1])
    else:
        sys.exit(__doc__)
