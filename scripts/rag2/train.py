#!/usr/bin/env python3
"""Train the second RedKnot test model (scripts/rag2/README.md): a plain Llama, NO locality loss, no
designated heads.  Two phases, each resumable across GPU calls of <= 10 minutes:

  --phase pretrain   LM loss on the English corpus from Debian packages (scripts/corpus/build_corpus.py,
                     pre-tokenized to .devcarry/rag2/corpus.u16.xz), packed windows [BOS] + 1024/2048 tokens
  --phase rag        the four RAG task families of scripts/rag (single, multihop, needle, dependent) on
                     documents that are real Wikipedia passages with generated facts
                     (scripts/rag2/gen_rag2.py), length curriculum up to 8K, loss = LM on every token
                     + --ans-weight x answer CE; --lm-rows of each batch are corpus windows (keeps English)

Every call: --time-budget-s T (wall seconds from start) is never overrun: training stops at
T - reserve, saves a full checkpoint (model + AdamW + data/schedule state, --ckpt-dir, kept on the GPU
machine between calls while it stays warm) and, with --export, the HF folder.  --resume continues
from --ckpt-dir; when the machine was lost, --init-from DIR continues from an exported folder
(weights + trainer_state.json: the schedule continues, AdamW restarts with --rewarmup steps).
Schedules (cosine LR, curriculum) are functions of the phase's progress = trained seconds / --phase-seconds,
so a phase can be split over any number of calls.  Seeds: --seed for init and the pretraining windows,
the RAG stream's worlds are seeded 'train2-<seed>-c<call>-w<worker>-<k>' (string seeds; eval sets use
integer seeds), so runs are reproducible up to timing (how many steps fit into the seconds).

Export (--export): HF LlamaForCausalLM folder: config.json, generation_config.json, tokenizer.json,
tokenizer_config.json, bf16 safetensors shards of <= --shard-mib MiB + model.safetensors.index.json,
trainer_state.json, results.json, README.md (model card skeleton).  --pack DIR additionally writes the
shards xz-compressed and the small files as one tar (<= 8 files, each < 16 MiB: what comes back from a
GPU call); scripts/rag2/unpack.py restores the folder.

CPU smoke test (torch 1.13 from Debian works; no `tokenizers` needed, the pure-Python BPE is used):
  /usr/bin/python3 scripts/rag2/train.py --phase pretrain --device cpu --tiny --time-budget-s 60 --no-compile
"""
import argparse
import array
import collections
import gzip
import io
import json
import lzma
import math
import os
import random
import re
import sys
import tarfile
import time

T0 = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "rag"))
import gen_data as G  # noqa: E402
import gen_rag2 as R  # noqa: E402
from unpack import bp_xz, unbp  # noqa: E402  (the byte-plane codec, torch-free for unpacking)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import multiprocessing as mp  # noqa: E402

import train as T1  # noqa: E402  (scripts/rag/train.py: the Llama module, greedy eval, HF parity)

TASKS = G.TASKS
DATA = os.path.join(ROOT, ".devcarry", "rag2")


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ================================================================ tokenizer
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# The Llama-3 split regex in Python `re` terms (no \p{..}): letters = [^\W\d_], numbers = \d, and
# "not letter/number" classes include "_".  Identical on ASCII text; checked against HF tokenizers on
# the eval sets (scripts/rag2/check_tok.py).
PY_SPLIT = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}| ?(?:[^\s\w]|_)+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class PyBPE:
    """Pure-Python byte-level BPE for tokenizer.json files of this family (fallback when the `tokenizers`
    package is absent, e.g. the CPU machine).  Cached per pre-token."""

    def __init__(self, path):
        j = json.load(open(path, encoding="utf-8"))
        m = j["model"]
        self.vocab = m["vocab"]
        self.inv = {i: t for t, i in self.vocab.items()}
        for a in j["added_tokens"]:
            self.inv[a["id"]] = a["content"]
        merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
        self.ranks = {p: i for i, p in enumerate(merges)}
        self.b2u = bytes_to_unicode()
        self.u2b = {v: k for k, v in self.b2u.items()}
        self.cache = {}

    def _bpe(self, tok):
        w = list(tok)
        while len(w) > 1:
            best, bi = None, None
            for i in range(len(w) - 1):
                r = self.ranks.get((w[i], w[i + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, i
            if best is None:
                break
            a, b = w[bi], w[bi + 1]
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            w = out
        return [self.vocab[x] for x in w]

    def encode(self, s):
        ids = []
        for piece in PY_SPLIT.findall(s):
            c = self.cache.get(piece)
            if c is None:
                c = self._bpe("".join(self.b2u[b] for b in piece.encode("utf-8")))
                if len(self.cache) < 500000:
                    self.cache[piece] = c
            ids += c
        return ids

    def decode(self, ids):
        bs = bytearray()
        for i in ids:
            t = self.inv.get(i, "")
            if t.startswith("<|") and t.endswith("|>"):
                continue
            bs += bytes(self.u2b[ch] for ch in t)
        return bs.decode("utf-8", errors="replace")


class Tok:
    def __init__(self, path, force_py=False):
        self.path = path
        self.kind = "py"
        try:
            if force_py:
                raise ImportError
            from tokenizers import Tokenizer
            self.tk = Tokenizer.from_file(path)
            self.kind = "hf"
        except ImportError:
            self.tk = PyBPE(path)
        j = json.load(open(path, encoding="utf-8"))
        sp = {a["content"]: a["id"] for a in j["added_tokens"]}
        self.bos, self.eos, self.pad = sp["<|bos|>"], sp["<|eos|>"], sp["<|pad|>"]
        self.vocab_size = len(j["model"]["vocab"])

    def encode(self, s):
        if self.kind == "hf":
            return self.tk.encode(s, add_special_tokens=False).ids
        return self.tk.encode(s)

    def encode_batch(self, ss):
        if self.kind == "hf":
            return [e.ids for e in self.tk.encode_batch(ss, add_special_tokens=False)]
        return [self.tk.encode(s) for s in ss]

    def decode(self, ids):
        if self.kind == "hf":
            return self.tk.decode(ids, skip_special_tokens=True)
        return self.tk.decode(ids)


# ================================================================ data
def load_corpus(path):
    """uint16 LE token stream (.u16 or .u16.xz) -> int32 tensor."""
    op = lzma.open if path.endswith(".xz") else open
    with op(path, "rb") as f:
        b = f.read()
    return (torch.frombuffer(bytearray(b), dtype=torch.int16).to(torch.int32) & 0xFFFF)


def corpus_rows(toks, n, L, bos, gen, lo=0, hi=None):
    """n rows of [BOS] + L tokens (L + 1 ids) from random offsets in toks[lo:hi]."""
    hi = toks.numel() if hi is None else hi
    s = torch.randint(lo, hi - L - 1, (n,), generator=gen)
    idx = s[:, None] + torch.arange(L)[None, :]
    rows = toks[idx].long()
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], 1)


class RagStream(torch.utils.data.IterableDataset):
    """Training samples of scripts/rag2/gen_rag2.py with extra QAs (the first model's recipe)."""

    def __init__(self, tok, seqlen, mix, seed, call, passages, extra_qa=12, qa_frac=4.0, world_samples=4,
                 min_scale=0.1, real_frac=(0.2, 0.8), real_sent=0.5):
        self.tok, self.seqlen, self.mix, self.seed, self.call = tok, seqlen, mix, seed, call
        self.passages = passages
        self.extra_qa, self.qa_frac, self.world_samples, self.min_scale = extra_qa, qa_frac, world_samples, min_scale
        self.real_frac, self.real_sent = real_frac, real_sent

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        wid = wi.id if wi is not None else 0
        rng = random.Random(f"train2-{self.seed}-c{self.call}-rng-{wid}")
        tok = self.tok
        P = self.passages
        pids = tok.encode_batch([p + "\n\n" for p in P])
        plen = [len(x) for x in pids]
        sents = R.sentences(P)
        qcache = {}
        k = 0
        while True:
            L = self.seqlen.value
            scale = min(1.0, max(self.min_scale, L / 8192.0))
            world = R.make_world(f"train2-{self.seed}-c{self.call}-w{wid}-{k}", scale, sents, self.real_sent)
            k += 1
            dids = tok.encode_batch([d["text"] + "\n\n" for d in world.docs])
            dlen = [len(x) for x in dids]

            def qlen(q, a):
                if (q, a) not in qcache:
                    if len(qcache) > 20000:
                        qcache.clear()
                    qcache[(q, a)] = len(tok.encode("Question: " + q + "\nAnswer:")) + len(tok.encode(" " + a)) + 1
                return qcache[(q, a)]

            qa_doc = collections.defaultdict(list)
            for d, q, a, _ in world.q_single:
                qa_doc[d].append((q, a))
            for d, q, a in world.needles:
                qa_doc[d].append((q, a))
            for da, db, q, a, _ in world.pairs:
                qa_doc[db].append((q, a, da))
            multi = [(da, db, q, a) for da, db, q, a, _ in world.q_multi]
            for _ in range(self.world_samples):
                if self.seqlen.value != L:
                    break
                reserve = min(40 * self.extra_qa, int(L / self.qa_frac)) if self.extra_qa else 0
                t = rng.choices(range(len(TASKS)), weights=self.mix)[0]
                rf = rng.uniform(*self.real_frac)
                s = R.make_sample(world, TASKS[t], L - reserve, rng, P, rf, doc_len=lambda d: dlen[d],
                                  psg_len=lambda i: plen[i], q_len=qlen)
                segs = [dids[x[1]] if x[0] == "w" else pids[x[1]] for x in s["segments"]]
                ids, a0 = T1.build_ids(tok, None, segs, s["question"], s["answers"][0])
                spans = [a0, len(ids)]
                wsegs = [x[1] for x in s["segments"] if x[0] == "w"]
                if self.extra_qa and len(ids) < L + 1:
                    present = set(wsegs)
                    order = [x[1] if x[0] == "w" else None for x in s["segments"]]
                    pos = {d: i for i, d in enumerate(order) if d is not None}
                    cands = []
                    for d in wsegs:
                        for x in qa_doc.get(d, ()):
                            if len(x) == 2 or (x[2] in present and pos[x[2]] == pos[d] - 1):
                                cands.append(x[:2])
                    cands += [(q, a) for da, db, q, a in multi if da in present and db in present]
                    cands = [x for x in cands if x[0] != s["question"]]
                    rng.shuffle(cands)
                    for q, a in cands[:self.extra_qa]:
                        qi = tok.encode("Question: " + q + "\nAnswer:")
                        ai = tok.encode(" " + a) + [tok.eos]
                        if len(ids) + len(qi) + len(ai) > L + 1:
                            break
                        ids += qi
                        spans += [len(ids), len(ids) + len(ai)]
                        ids += ai
                if len(ids) > L + 1:
                    continue
                yield t, array.array("i", spans).tobytes(), array.array("i", ids).tobytes()


# ================================================================ checkpoint / export
def hf_config(c, tok):
    cfg = T1.hf_config(c, tok)
    return cfg


def save_safetensors(tensors, path):
    """stdlib safetensors writer (bf16/f32), so no `safetensors` package is needed."""
    names = sorted(tensors)
    header, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for n in names:
        t = tensors[n].contiguous().cpu()
        dt = {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype]
        b = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[n] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_weights(d):
    """{name: f32 tensor} from DIR/model.safetensors, or DIR's shards (plain or .xz)."""
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return T1.load_safetensors(os.path.join(d, "model.safetensors"))
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else \
        sorted(f[:-6] for f in os.listdir(d) if f.endswith(".safetensors.bp.xz"))
    out = {}
    for f in files:
        p = os.path.join(d, f)
        if not os.path.exists(p) and os.path.exists(p + ".bp.xz"):
            with open("/tmp/_rk_shard.safetensors", "wb") as dst:
                dst.write(unbp(p + ".bp.xz"))
            p = "/tmp/_rk_shard.safetensors"
        out.update(T1.load_safetensors(p))
    return out


def export_hf(model, tok, out_dir, shard_mib, state, results):
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}
    limit = int(shard_mib * 1024 * 1024) - 65536        # header room
    shards, cur, size = [], {}, 0
    for n in sorted(sd):
        b = sd[n].numel() * 2
        if cur and size + b > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[n] = sd[n]
        size += b
    if cur:
        shards.append(cur)
    wm, total = {}, 0
    for f in os.listdir(out_dir):
        if f.startswith("model") and f.endswith(".safetensors"):
            os.unlink(os.path.join(out_dir, f))
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(sh, os.path.join(out_dir, name))
        for n in sh:
            wm[n] = name
            total += sh[n].numel() * 2
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model.c, tok), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": tok.pad,
                   "do_sample": False, "max_new_tokens": 16}, f, indent=2)
    tdir = os.path.dirname(tok.path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tdir, f), "rb") as s, open(os.path.join(out_dir, f), "wb") as d:
            d.write(s.read())
    with open(os.path.join(out_dir, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    return sd


def pack(out_dir, pack_dir, extra_files=()):
    """xz each shard (parallel), tar the small files: <= 8 files back from a GPU call."""
    os.makedirs(pack_dir, exist_ok=True)
    shards = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    with mp.get_context("fork").Pool(max(1, min(len(shards), os.cpu_count() or 1))) as pool:
        pool.starmap(bp_xz, [(os.path.join(out_dir, f), os.path.join(pack_dir, f + ".bp.xz")) for f in shards])
    with tarfile.open(os.path.join(pack_dir, "model_small_files.tar"), "w") as t:
        for f in sorted(os.listdir(out_dir)):
            if not f.endswith(".safetensors"):
                t.add(os.path.join(out_dir, f), arcname=f)
        for p in extra_files:
            if os.path.exists(p):
                t.add(p, arcname=os.path.basename(p))
    return sorted(os.listdir(pack_dir))


def model_card(results):
    c, r = results.get("config", {}), results
    lines = ["# redknot-rag2-8k: second long-context RAG test model (plain Llama, no locality loss)", "",
             "> Model card skeleton written by scripts/rag2/train.py; fill in the measured numbers.", "",
             "| field | value |", "|---|---|",
             f"| parameters | {r.get('params', 0) / 1e6:.2f} M (tied embeddings) |",
             f"| hidden / layers / FFN | {c.get('hidden_size')} / {c.get('num_hidden_layers')} / {c.get('intermediate_size')} (SwiGLU) |",
             f"| heads | {c.get('num_attention_heads')} query, {c.get('num_key_value_heads')} KV (GQA), head_dim {c.get('head_dim')} |",
             f"| RoPE theta | {c.get('rope_theta')} |", f"| vocab | {c.get('vocab_size')} byte-level BPE |",
             "| locality loss / designated heads | none |", "", "## Training", ""]
    for ph, st in r.get("phases", {}).items():
        lines.append(f"- {ph}: {st.get('steps', 0)} steps, {st.get('tokens', 0) / 1e6:.1f} M tokens, "
                     f"{st.get('seconds', 0):.0f} s of training")
    lines += ["", "## Eval (greedy, EM)", ""]
    for name, ev in r.get("eval", {}).items():
        for mode in ("full", "naive"):
            if mode in ev:
                lines.append(f"- {name} {mode}: " + ", ".join(f"{k} {v['em']:.1f} (n={v['n']})" for k, v in ev[mode].items()))
    if "hf_parity" in r:
        lines += ["", f"HF parity: {json.dumps(r['hf_parity'])}"]
    return "\n".join(lines) + "\n"


# ================================================================ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["pretrain", "rag"], required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/rag2_out"))
    ap.add_argument("--data", default=DATA, help="folder of prep.sh outputs")
    # Outside the repo: the GPU machine replaces the working tree (and carried folders) on every
    # call, so a checkpoint inside it does not survive to the next call (seen 2026-12-06).
    ap.add_argument("--ckpt-dir", default="/var/tmp/redknot-ckpt-rag2")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/ckpt.pt if it exists")
    ap.add_argument("--init-from", default="", help="exported folder (weights + trainer_state.json)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--time-budget-s", type=float, default=540)
    ap.add_argument("--reserve-s", type=float, default=25, help="seconds kept for the checkpoint")
    ap.add_argument("--pack-reserve-s", type=float, default=40, help="seconds kept for --pack (export + xz)")
    ap.add_argument("--phase-seconds", type=float, default=0,
                    help="planned training seconds of this phase over all calls (schedule length); "
                         "default: pretrain 200, rag 900")
    ap.add_argument("--seed", type=int, default=1234)
    # model
    ap.add_argument("--tiny", action="store_true", help="tiny CPU config for smoke tests")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--max-len", type=int, default=8192)
    # optimisation
    ap.add_argument("--lr", type=float, default=0, help="peak lr (default: pretrain 2e-3, rag 1e-3)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rewarmup", type=int, default=50, help="warm-up steps after --init-from (fresh AdamW)")
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--batch-tokens", type=int, default=131072)
    ap.add_argument("--micro-tokens", type=int, default=65536, help="tokens per forward (gradient accumulation)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    # pretraining
    ap.add_argument("--pretrain-curriculum", default="1024:0.6,2048:1.0")
    ap.add_argument("--val-tokens", type=int, default=262144, help="held-out tail of the corpus")
    # rag
    ap.add_argument("--rag-curriculum", default="2048:0.15,4096:0.4,8192:1.0")
    ap.add_argument("--mix", default="0.4,0.25,0.1,0.25", help="single,multihop,needle,dependent")
    ap.add_argument("--ans-weight", type=float, default=3.0)
    ap.add_argument("--lm-rows", type=float, default=0.1, help="rag phase: share of rows that are corpus windows")
    ap.add_argument("--extra-qa", type=int, default=12)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--probe-every", type=float, default=60)
    ap.add_argument("--probe-n", type=int, default=8)
    # end of call
    ap.add_argument("--export", action="store_true", help="export the HF folder (+ eval, parity) at the end")
    ap.add_argument("--shard-mib", type=float, default=15)
    ap.add_argument("--pack", default="", help="write the weights as byte-plane xz shards + a tar of the small "
                    "files here (what comes back from a GPU call; ~0.68 x bf16 size); without --export no eval")
    ap.add_argument("--eval", default="rag2-8k,rag2-4k", help="eval sets in DATA/eval to run at export")
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--eval-reserve-s", type=float, default=150, help="seconds kept for export + eval")
    a = ap.parse_args()
    if a.tiny:
        a.hidden, a.layers, a.heads, a.kv_heads, a.head_dim, a.ffn = 64, 2, 4, 2, 16, 128
        a.batch_tokens, a.micro_tokens, a.workers, a.probe_n = 4096, 4096, 1, 1
        a.pretrain_curriculum, a.rag_curriculum = "256:0.5,512:1.0", "1024:0.5,2048:1.0"
        a.val_tokens = 8192
    pre = a.phase == "pretrain"
    a.lr = a.lr or (2e-3 if pre else 1e-3)
    a.phase_seconds = a.phase_seconds or (200.0 if pre else 900.0)
    deadline = T0 + a.time_budget_s
    train_end = deadline - a.reserve_s - (a.pack_reserve_s if a.pack else 0) - (a.eval_reserve_s if a.export else 0)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.ckpt_dir, exist_ok=True)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = {"args": vars(a), "torch": torch.__version__, "phases": {}}
    if dev.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    rpath = os.path.join(a.out, f"results_{a.phase}.json")

    def dump():
        with open(rpath, "w") as f:
            json.dump(results, f, indent=1)

    tok = Tok(os.path.join(a.data, "tokenizer", "tokenizer.json"))
    log(f"tokenizer {tok.kind}: vocab {tok.vocab_size}")
    c = {"vocab_size": tok.vocab_size, "hidden_size": a.hidden, "intermediate_size": a.ffn,
         "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
         "head_dim": a.head_dim, "rms_norm_eps": 1e-5, "rope_theta": a.rope_theta, "max_position_embeddings": a.max_len}

    # ---------------- state: full checkpoint > init-from > fresh
    ck_path = os.path.join(a.ckpt_dir, "ckpt.pt")
    ck = None
    state = {"phase": a.phase, "step": 0, "tokens": 0, "phase_time": 0.0, "calls": 0, "history": []}
    if a.resume and os.path.exists(ck_path):
        ck = torch.load(ck_path, map_location="cpu")
        if ck["state"]["phase"] != a.phase:
            log(f"checkpoint is phase {ck['state']['phase']}: new phase {a.phase} starts from its weights")
            state["prev"] = {k: v for k, v in ck["state"].items() if k != "history"}
            c = ck["config"]
            ck = {"model": ck["model"], "config": ck["config"]}
        else:
            state = ck["state"]
            c = ck["config"]
    torch.manual_seed(a.seed)
    model = T1.Llama(c)
    if ck is not None:
        model.load_state_dict(ck["model"])
        log(f"resumed from {ck_path}: step {state['step']}, phase time {state['phase_time']:.0f}s")
    elif a.init_from:
        cfg = json.load(open(os.path.join(a.init_from, "config.json")))
        for k in c:
            if k in cfg:
                c[k] = cfg[k]
        model = T1.Llama(c)
        model.load_state_dict(load_weights(a.init_from), strict=True)
        sp = os.path.join(a.init_from, "trainer_state.json")
        if os.path.exists(sp):
            st = json.load(open(sp))
            if st.get("phase") == a.phase:
                state = st
                state["rewarm_from"] = state["step"]
            else:
                state["prev"] = {k: v for k, v in st.items() if k != "history"}
        log(f"initialised from {a.init_from}: phase {state['phase']} step {state['step']}")
    state["calls"] = state.get("calls", 0) + 1
    call = state["calls"]
    # ---------------- data (DataLoader workers fork before CUDA is initialised)
    corpus_path = os.path.join(a.data, "corpus.u16.xz")
    if not os.path.exists(corpus_path):
        corpus_path = corpus_path[:-3]
    toks = None
    if pre or a.lm_rows > 0:
        toks = load_corpus(corpus_path)
        log(f"corpus: {toks.numel() / 1e6:.1f}M tokens from {corpus_path}")
    n_train_tok = toks.numel() - a.val_tokens if toks is not None else 0
    curriculum = [(int(x), float(y)) for x, y in (s.split(":") for s in
                                                 (a.pretrain_curriculum if pre else a.rag_curriculum).split(","))]

    def length_at(progress):
        for L, end in curriculum:
            if progress < end:
                return L
        return curriculum[-1][0]

    seqlen = mp.Value("i", length_at(state["phase_time"] / a.phase_seconds), lock=False)
    it = dl = None
    probe_sets = {}
    if not pre:
        with gzip.open(os.path.join(a.data, "passages-train.jsonl.gz"), "rt", encoding="utf-8") as f:
            passages = [json.loads(l)["text"] for l in f]
        ds = RagStream(tok, seqlen, [float(x) for x in a.mix.split(",")], a.seed, call, passages,
                       extra_qa=a.extra_qa)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=a.workers,
                                         prefetch_factor=16 if a.workers else None,
                                         persistent_workers=bool(a.workers))
        it = iter(dl)
        if a.probe_every > 0:
            for L, _ in curriculum:
                probe_sets[L] = R.generate(L, a.probe_n, 70000 + L, "eval", cpt=3.6)

    model = model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    results.update(params=n_params, config=c)
    log(f"model params {n_params / 1e6:.2f}M ({(n_params - c['vocab_size'] * c['hidden_size']) / 1e6:.2f}M "
        f"non-embedding), config {c}")

    fused = dev.type == "cuda"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))
    if ck is not None and "opt" in ck:
        opt.load_state_dict(ck["opt"])
    amp = dev.type == "cuda"

    def loss_fn(inp, tgt, ans):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(inp)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                             reduction="none").view(tgt.shape)
        valid = tgt != -100
        return ce, valid, (logits.argmax(-1) == tgt)

    fn = torch.compile(loss_fn, dynamic=False) if a.compile and dev.type == "cuda" else loss_fn

    def get_batch(L, B, step):
        """-> inp, tgt, ans (bool), is_rag (bool per row), task per row"""
        gen = torch.Generator().manual_seed(a.seed * 1000003 + step * 7 + call * 1000000007)
        n_lm = B if pre else int(round(B * a.lm_rows))
        rows_inp, rows_tgt, rows_ans, task = [], [], [], []
        if n_lm:
            r = corpus_rows(toks, n_lm, L, tok.bos, gen, 0, n_train_tok)
            rows_inp.append(r[:, :-1])
            rows_tgt.append(r[:, 1:])
            rows_ans.append(torch.zeros(n_lm, L, dtype=torch.bool))
            task += [-1] * n_lm
        if B - n_lm:
            samples = [next(it) for _ in range(B - n_lm)]
            inp, tgt, ans, _, tk = T1.make_batch(samples, L, tok.pad)
            rows_inp.append(inp)
            rows_tgt.append(tgt)
            rows_ans.append(ans)
            task += tk.tolist()
        return torch.cat(rows_inp), torch.cat(rows_tgt), torch.cat(rows_ans), torch.tensor(task)

    @torch.no_grad()
    def val_loss(L=256 if a.tiny else 1024, n=4 if a.tiny else 16):
        if toks is None:
            return None
        gen = torch.Generator().manual_seed(99)
        r = corpus_rows(toks, n, L, tok.bos, gen, n_train_tok, toks.numel()).to(dev)
        model.eval()
        ce, valid, _ = loss_fn(r[:, :-1], r[:, 1:], None)
        model.train()
        return float(ce.mean())

    def probe(L):
        model.eval()
        r, _ = T1.evaluate(model, tok, probe_sets[L], dev, ["full"], torch.bfloat16 if amp else torch.float32,
                           2 * a.eval_batch)
        model.train()
        em = {k: round(v["em"]) for k, v in r["full"].items()}
        state["history"].append({"probe": L, "step": state["step"], "em": em})
        log(f"probe step {state['step']} L={L}: " + " ".join(f"{k}={v}" for k, v in em.items()))

    # ---------------- train
    model.train()
    t_call = time.time()
    t_last_probe = time.time()
    step0, tok0, flops_tok = state["step"], state["tokens"], None
    nonemb = n_params - c["vocab_size"] * c["hidden_size"]
    peak = 989e12 if dev.type == "cuda" else 1e12
    log(f"phase {a.phase}: progress {state['phase_time'] / a.phase_seconds:.3f}, training until "
        f"{train_end - T0:.0f}s")
    win_t, win_tok = time.time(), 0
    seen_shapes = set()
    while True:
        now = time.time()
        progress = state["phase_time"] / a.phase_seconds
        if now >= train_end or progress >= 1.0:
            break
        L = length_at(progress)
        if seqlen.value != L:
            seqlen.value = L
            log(f"seq_len -> {L} at step {state['step']} (progress {progress:.2f})")
        B = max(1, a.batch_tokens // L)
        mb = max(1, min(B, a.micro_tokens // L))
        warm = min(1.0, (state["step"] + 1) / a.warmup)
        if "rewarm_from" in state:
            warm = min(warm, (state["step"] - state["rewarm_from"] + 1) / a.rewarmup)
        lr = a.lr * warm * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for g in opt.param_groups:
            g["lr"] = lr
        t_step = time.time()
        inp, tgt, ans, task = get_batch(L, B, state["step"])
        opt.zero_grad(set_to_none=True)
        stats = collections.defaultdict(float)
        nvalid_all = int((tgt != -100).sum())
        nans_all = max(1, int(ans.sum()))
        first_hit = first_n = 0
        new_shape = (L, mb) not in seen_shapes
        seen_shapes.add((L, mb))
        for m0 in range(0, B, mb):
            x, y, an = (t[m0:m0 + mb].to(dev, non_blocking=True) for t in (inp, tgt, ans))
            try:
                ce, valid, hit = fn(x, y, an)
            except Exception as e:  # torch.compile trouble: eager from here on
                if fn is loss_fn:
                    raise
                log("torch.compile failed, eager from now on:", repr(e)[:1000])
                results["compile"] = "failed: " + repr(e)[:300]
                fn = loss_fn
                ce, valid, hit = fn(x, y, an)
            lm = ce[valid].sum() / nvalid_all
            al = (ce * an).sum() / nans_all
            loss = lm + a.ans_weight * al
            loss.backward()
            stats["lm"] += float(lm)
            stats["ans"] += float(al)
            if state["step"] % 25 == 0 and bool(an.any()):
                first = an & ~torch.cat([torch.zeros_like(an[:, :1]), an[:, :-1]], 1)
                first_hit += int(hit[first].sum())
                first_n += int(first.sum())
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t_step
        if new_shape and fn is not loss_fn:
            dt = min(dt, 2.0)          # a compile step: its warm-up does not count as training time
        state["phase_time"] += dt
        state["step"] += 1
        state["tokens"] += nvalid_all
        win_tok += nvalid_all
        if state["step"] % 25 == 1 or a.tiny:
            el = time.time() - win_t
            tps = win_tok / max(1e-9, el)
            # 6 N per token for the matmuls (LM head included) + causal attention 6 * layers * L * q_dim
            fpt = 6 * n_params + 6 * c["num_hidden_layers"] * L * c["num_attention_heads"] * c["head_dim"]
            mfu = tps * fpt / peak
            h = {"step": state["step"], "t": round(time.time() - T0, 1), "L": L, "B": B, "lr": lr,
                 "lm": stats["lm"], "ans": stats["ans"], "gnorm": float(gn), "tok_s": tps, "mfu": mfu,
                 "tokens": state["tokens"], "progress": round(progress, 4)}
            if first_n:
                h["first_tok_acc"] = first_hit / first_n
            if state["step"] % 100 == 1 or (a.tiny and state["step"] % 5 == 1):
                v = val_loss()
                if v is not None:
                    h["val_lm"] = v
            state["history"].append(h)
            log(f"step {state['step']} L={L} B={B} lr={lr:.2e} lm={stats['lm']:.3f} ans={stats['ans']:.3f} "
                f"gn={float(gn):.2f} tok/s={tps / 1e3:.0f}K mfu={100 * mfu:.1f}% tokens={state['tokens'] / 1e6:.1f}M"
                + (f" val={h['val_lm']:.3f}" if "val_lm" in h else "")
                + (f" first_tok_acc={h['first_tok_acc']:.2f}" if "first_tok_acc" in h else ""))
            win_t, win_tok = time.time(), 0
        if probe_sets and time.time() - t_last_probe > a.probe_every and time.time() < train_end - 20:
            probe(L)
            t_last_probe = time.time()
    took = time.time() - t_call
    ph = {"steps": state["step"] - step0, "tokens": state["tokens"] - tok0, "seconds": took,
          "progress": state["phase_time"] / a.phase_seconds}
    results["phases"][a.phase] = ph
    results["state"] = {k: v for k, v in state.items() if k != "history"}
    results["history"] = state["history"]
    log(f"call done: {ph['steps']} steps, {ph['tokens'] / 1e6:.1f}M tokens in {took:.0f}s; phase progress "
        f"{ph['progress']:.3f}; total step {state['step']}")
    if probe_sets and time.time() < train_end + 10:
        probe(length_at(min(0.999, state["phase_time"] / a.phase_seconds)))
    dump()
    if it is not None:
        del it, dl
    # ---------------- checkpoint (full: weights, optimizer, state)
    t = time.time()
    tmp = ck_path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "config": c}, tmp)
    os.replace(tmp, ck_path)
    log(f"checkpoint {ck_path} ({os.path.getsize(ck_path) / 1e6:.0f} MB) in {time.time() - t:.1f}s")
    if not a.export and not a.pack:
        dump()
        log("done")
        return

    # ---------------- export (+ parity + eval with --export)
    model.eval()
    mdir = os.path.join(a.ckpt_dir, "export", "redknot-rag2-8k")
    sd = export_hf(model, tok, mdir, a.shard_mib, {k: v for k, v in state.items()}, results)
    log("exported", sorted(os.listdir(mdir)))
    if not a.export:
        with open(os.path.join(mdir, "training_results.json"), "w") as f:
            json.dump(results, f, indent=1)
        t = time.time()
        log("packed", pack(mdir, a.pack), f"in {time.time() - t:.0f}s")
        dump()
        log("done")
        return
    data = {}
    for name in [x for x in a.eval.split(",") if x]:
        p = os.path.join(a.data, "eval", name + ".jsonl.gz")
        if os.path.exists(p):
            with gzip.open(p, "rt") as f:
                d = [json.loads(l) for l in f]
            if a.eval_limit:
                by = collections.defaultdict(list)
                for s in d:
                    by[s["task"]].append(s)
                d = [s for t_ in TASKS for s in by[t_][:max(1, a.eval_limit // len(TASKS))]]
            data[name] = d
    first = next(iter(data.values()), [])
    if dev.type == "cuda" and first:
        try:
            results["hf_parity"] = T1.hf_parity(mdir, c, sd, tok, first, dev)
            log("hf parity", results["hf_parity"])
        except Exception as e:  # report, do not die
            results["hf_parity"] = {"error": repr(e)[:500]}
            log("hf parity FAILED", repr(e)[:500])
        torch.backends.cuda.matmul.allow_tf32 = True
    dump()
    allp = []
    edt = torch.bfloat16 if amp else torch.float32
    for name, d in data.items():
        if time.time() > deadline - a.reserve_s - 20:
            log(f"skip eval {name}: no time")
            continue
        r, preds = T1.evaluate(model, tok, d, dev, ["full", "naive"], edt, a.eval_batch,
                               deadline=deadline - a.reserve_s - 10, tag=name)
        results.setdefault("eval", {})[name] = r
        for m in ("full", "naive"):
            log(f"eval {name} {m}: " + " ".join(f"{k}: EM {v['em']:.1f} F1 {v['f1']:.1f} (n={v['n']})"
                                                for k, v in r[m].items()))
        for i, s in enumerate(d):
            allp.append({"set": name, "id": s.get("id"), "task": s["task"], "answers": s["answers"],
                         "full": preds["full"][i], "naive": preds["naive"][i]})
        dump()
    if allp:
        with gzip.open(os.path.join(mdir, "eval_predictions.jsonl.gz"), "wt") as f:
            for p_ in allp:
                f.write(json.dumps(p_) + "\n")
    results["wall_s"] = time.time() - T0
    with open(os.path.join(mdir, "README.md"), "w") as f:
        f.write(model_card(results))
    with open(os.path.join(mdir, "training_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    dump()
    if a.pack:
        files = pack(mdir, a.pack)
        log("packed", files)
    log("done")


if __name__ == "__main__":
    main()
