#!/usr/bin/env python3
"""CPU recipe experiments for the RAG model (small model, short context, word/chunk tokenizer).

Uses train.py's model, Stream (training data) and evaluate() unchanged; eval samples are
gen_data.generate() (the committed-eval generator, full-size worlds) at the experiment length
with integer seeds, so they are held out from the 'train-*' string seeds.
  /usr/bin/python3 scripts/rag/cpu_exp.py --L 512 --steps 600 --world-samples 4 --tag A
"""
import argparse, math, time, json, sys, os, random, collections
import torch
import torch.nn.functional as F
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train as T
import gen_data as G
import cpu_tok

ap = argparse.ArgumentParser()
ap.add_argument("--tag", default="x")
ap.add_argument("--lm-sub", type=float, default=0.25)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--L", type=int, default=512)
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--minutes", type=float, default=8)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--kv", type=int, default=2)
ap.add_argument("--ffn", type=int, default=384)
ap.add_argument("--theta", type=float, default=100000.0)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--warmup", type=int, default=50)
ap.add_argument("--lm-w", type=float, default=1.0)
ap.add_argument("--ans-w", type=float, default=2.0)
ap.add_argument("--extra-qa", type=int, default=7)
ap.add_argument("--qa-frac", type=float, default=6.0)
ap.add_argument("--world-samples", type=int, default=0)
ap.add_argument("--world-tokens", type=int, default=200000)
ap.add_argument("--streams", type=int, default=14)
ap.add_argument("--mix", default="0.3,0.25,0.1,0.35")
ap.add_argument("--eval-every", type=int, default=150)
ap.add_argument("--eval-n", type=int, default=30)
ap.add_argument("--eval-L", default="")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
tok = cpu_tok.WordChunkTok()
c = {"vocab_size": tok.vocab_size, "hidden_size": args.hidden, "intermediate_size": args.ffn,
     "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv,
     "head_dim": args.hidden // args.heads, "rms_norm_eps": 1e-5, "rope_theta": args.theta,
     "max_position_embeddings": 8192}
model = T.Llama(c)
print(f"[{args.tag}] params {T.param_count(model)/1e6:.2f}M args {vars(args)}", flush=True)


class V:  # stands in for mp.Value
    value = args.L


mix = [float(x) for x in args.mix.split(",")]
streams = []
for w in range(args.streams):
    s = T.Stream(tok, V, mix, "cpu", world_tokens=args.world_tokens, extra_qa=args.extra_qa,
                 world_samples=args.world_samples, qa_frac=args.qa_frac)
    s.wid = w
    streams.append(iter(s))
rr = [0]


def nxt():
    rr[0] += 1
    return next(streams[rr[0] % len(streams)])


evL = [int(x) for x in args.eval_L.split(",")] if args.eval_L else [args.L]
evsets = {L: G.generate(L, args.eval_n, 900 + L, cpt=4.07 * 1.0) for L in evL}
for L, d in evsets.items():
    n = [len(T.encode_eval(tok, s)[0]) for s in d]
    print(f"[{args.tag}] eval L={L} prompt tokens min {min(n)} max {max(n)}", flush=True)

decay = [p for p in model.parameters() if p.dim() >= 2]
nod = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nod, "weight_decay": 0.0}],
                        lr=args.lr, betas=(0.9, 0.95))


def run_eval(step):
    model.eval()
    out = {}
    for L, d in evsets.items():
        r, _ = T.evaluate(model, tok, d, torch.device("cpu"), ["full"], torch.float32, 16)
        out[L] = {k: round(v["em"], 1) for k, v in r["full"].items()}
    model.train()
    print(f"[{args.tag}] EVAL step {step} " + " ".join(f"L{L}: " + json.dumps(v) for L, v in out.items()), flush=True)
    return out


t0 = time.time()
acc = collections.defaultdict(float)
nacc = 0
step = 0
while step < args.steps and time.time() - t0 < args.minutes * 60:
    lr = args.lr * min(1, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    for g in opt.param_groups:
        g["lr"] = lr
    inp, tgt, ans, ans_main, task = T.make_batch([nxt() for _ in range(args.batch)], args.L, tok.pad)
    # logits only at answer positions + a random subset of the other positions (CPU speed)
    x = model.model.embed_tokens(inp)
    cos, sin = model.rope(torch.arange(inp.shape[1]))
    for layer in model.model.layers:
        x = layer(x, cos, sin)
    sel = ans | ((torch.rand(ans.shape) < args.lm_sub) & (tgt != -100))
    h = model.model.norm(x[sel])
    lg = h @ model.model.embed_tokens.weight.t()
    ce = F.cross_entropy(lg, tgt[sel], ignore_index=-100, reduction="none")
    a_s = ans[sel]
    lm = ce[~a_s].mean() if (~a_s).any() else ce.sum() * 0
    al = ce[a_s].mean()
    logits = torch.full(tgt.shape + (1,), -1, dtype=torch.long)
    loss = args.lm_w * lm + args.ans_w * al
    opt.zero_grad()
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    pred = torch.full(tgt.shape, -1, dtype=torch.long); pred[sel] = lg.argmax(-1)
    ok = ((pred == tgt) | ~ans).all(-1).float().mean()   # all answers of the sample right
    acc["lm"] += lm.item(); acc["ans"] += al.item(); acc["ok"] += ok.item(); acc["gn"] += float(gn)
    acc["ansfrac"] += (ans.sum() / (tgt != -100).sum()).item()
    nacc += 1
    step += 1
    if step % 25 == 0:
        print(f"[{args.tag}] step {step} t={time.time()-t0:.0f}s lr={lr:.1e} " +
              " ".join(f"{k}={v/nacc:.3f}" for k, v in acc.items()), flush=True)
        acc.clear(); nacc = 0
    if step % args.eval_every == 0:
        run_eval(step)
if step % args.eval_every:
    run_eval(step)
print(f"[{args.tag}] done {step} steps {time.time()-t0:.0f}s", flush=True)
