#!/usr/bin/env python3
"""Which tokens need the FFN? An offline study of Sparse FFN importance rules on the shipped RAG model.

Full prefill of eval prompts (CPU, f32, eager torch) where, from layer --dense-until on, only a fraction
of the rows run the FFN (the rest get FFN output 0), chosen by one rule, plus the last --recent-n rows.
Compared with dense prefill: top-1 agreement and cosine of the last token's logits. Rules:
  attn_norm         SPEC §4 / the paper: L2 norm of the token's attention output (all heads, before o_proj)
  attn_norm_global  the same over the global heads' columns only
  recv_global       attention mass the last --probe-n rows (the question) put on the token in global heads
  random            uniform
Needs torch (any version with F.softmax) and the C++ tokenizer (build/redknot tokenize).
  python3 scripts/rag/sparse_ffn_exp.py --n 16 --keep 0.15
"""
import argparse, gzip, json, math, os, struct, subprocess, sys
import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))


def load(mdir):
    raw = open(os.path.join(mdir, "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    sd = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        t = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=torch.bfloat16)
        sd[k] = t.float().view(v["shape"])
    return json.load(open(os.path.join(mdir, "config.json"))), sd


def tokenize(mdir, text):
    out = subprocess.run([os.path.join(ROOT, "build/redknot"), "tokenize", "--model", mdir],
                         input=text.encode(), capture_output=True, check=True).stdout.decode()
    return json.loads(out)


def prompt_ids(mdir, s):
    ids = [0]
    for seg in s["segments"]:
        ids += tokenize(mdir, seg + "\n\n")
    return ids + tokenize(mdir, "Question: " + s["question"] + "\nAnswer:")


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def forward(cfg, sd, ids, rule=None, keep=0.15, dense_until=2, recent_n=128, probe_n=32, glob=(), seed=0):
    T = len(ids)
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rep = H // KV
    eps = cfg["rms_norm_eps"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
    f = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, sd[p + "input_layernorm.weight"], eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].t()).view(T, H, D).transpose(0, 1)
        k = (h @ sd[p + "self_attn.k_proj.weight"].t()).view(T, KV, D).transpose(0, 1)
        v = (h @ sd[p + "self_attn.v_proj.weight"].t()).view(T, KV, D).transpose(0, 1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        pr = s.masked_fill(~causal, float("-inf")).softmax(-1)          # [H, T, T]
        o = pr @ v                                                          # [H, T, D]
        gh = [hh for hh in range(H) if (l, hh // rep) in glob]
        attn = o.transpose(0, 1).reshape(T, H * D)
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].t()
        h2 = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        ffn = (F.silu(h2 @ sd[p + "mlp.gate_proj.weight"].t()) * (h2 @ sd[p + "mlp.up_proj.weight"].t())) \
            @ sd[p + "mlp.down_proj.weight"].t()
        if rule is None or l < dense_until:
            x = x + ffn
            continue
        if rule == "attn_norm":
            imp = attn.norm(dim=-1)
        elif rule == "attn_norm_global":
            imp = o[gh].transpose(0, 1).reshape(T, -1).norm(dim=-1) if gh else attn.norm(dim=-1)
        elif rule == "recv_global":
            imp = pr[gh][:, T - probe_n:].sum(dim=(0, 1)) if gh else torch.rand(T, generator=gen)
        else:
            imp = torch.rand(T, generator=gen)
        n_keep = max(1, int(keep * T))
        rows = set(torch.topk(imp, n_keep).indices.tolist()) | set(range(max(0, T - recent_n), T))
        m = torch.zeros(T, 1)
        m[list(rows)] = 1
        kept.append(len(rows) / T)
        x = x + ffn * m
    x = rms(x, sd["model.norm.weight"], eps)
    return x[-1] @ sd["model.embed_tokens.weight"].t(), kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models/redknot-rag-8k"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data/eval/rag-4k.jsonl.gz"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--keep", type=float, default=0.15)
    ap.add_argument("--dense-until", type=int, default=2)
    ap.add_argument("--recent-n", type=int, default=128)
    ap.add_argument("--rules", default="attn_norm,attn_norm_global,recv_global,random")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg, sd = load(a.model)
    prof = json.load(open(os.path.join(a.model, "head_profile.json")))
    glob = {(l, g) for l, row in enumerate(prof["heads"]) for g, hh in enumerate(row) if hh["class"] == "global"}
    samples = [json.loads(l) for _, l in zip(range(a.n), gzip.open(a.data, "rt"))]
    rules = a.rules.split(",")
    stats = {r: [0, 0.0, []] for r in rules}
    for i, s in enumerate(samples):
        ids = prompt_ids(a.model, s)
        ref, _ = forward(cfg, sd, ids)
        for r in rules:
            lg, kept = forward(cfg, sd, ids, r, a.keep, a.dense_until, a.recent_n, glob=glob, seed=i)
            stats[r][0] += int(lg.argmax() == ref.argmax())
            stats[r][1] += float(F.cosine_similarity(lg, ref, dim=0))
            stats[r][2] += kept
        print(f"[{i + 1}/{len(samples)}] T={len(ids)} " + " ".join(
            f"{r}: top1 {stats[r][0]}/{i + 1}" for r in rules), file=sys.stderr, flush=True)
    print(f"| rule | top-1 vs dense | logits cos | rows kept (sparse layers) |  (n={len(samples)}, keep {a.keep}, "
          f"dense_until {a.dense_until}, recent_n {a.recent_n})")
    print("|---|---|---|---|")
    for r in rules:
        t, c, k = stats[r]
        print(f"| {r} | {t / len(samples):.3f} | {c / len(samples):.4f} | {sum(k) / max(1, len(k)):.3f} |")


if __name__ == "__main__":
    main()
