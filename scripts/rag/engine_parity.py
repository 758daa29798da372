#!/usr/bin/env python3
"""Logits parity: RedKnot's C++ engine vs the training script's PyTorch model on eval prompts.

The training script checks its model against HF transformers on the GPU machine (the model card's
"hf parity" line); this closes the chain on any machine with torch (CPU is fine): the same token ids
go through `redknot generate --logits-out` and through scripts/rag/train.py's Llama, loaded from the
exported bf16 safetensors, and every prompt position's logits are compared.

  /usr/bin/python3 scripts/rag/engine_parity.py --model models/redknot-rag-8k \
      --data data/eval/rag-8k.jsonl.gz --n 3

Prints one line per prompt and a JSON summary; exits 1 when a prompt's max |diff| exceeds --tol or
the last position's argmax differs.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch  # noqa: E402
import train as T  # noqa: E402


def tokenize(redknot, model, text):
    r = subprocess.run([redknot, "tokenize", "--model", model], input=text.encode(), capture_output=True,
                       check=True)
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def prompt_ids(redknot, model, sample, bos):
    # The training/eval prompt format (model card): every piece tokenized on its own.
    ids = [bos]
    for seg in sample["segments"]:
        ids += tokenize(redknot, model, seg + "\n\n")
    return ids + tokenize(redknot, model, "Question: " + sample["question"] + "\nAnswer:")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=3, help="prompts (one per task family, in file order)")
    ap.add_argument("--redknot", default=os.path.join(HERE, "../../build/redknot"))
    ap.add_argument("--tol", type=float, default=2e-3, help="max |logit diff| allowed (f32 vs f32)")
    args = ap.parse_args()

    cfg = json.load(open(os.path.join(args.model, "config.json")))
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings"]
    model = T.Llama({k: cfg[k] for k in keys}).eval()
    single = os.path.join(args.model, "model.safetensors")
    if os.path.exists(single):
        sd = T.load_safetensors(single)
    else:  # sharded (model.safetensors.index.json), e.g. the second test model
        sd = {}
        wm = json.load(open(os.path.join(args.model, "model.safetensors.index.json")))["weight_map"]
        for f in sorted(set(wm.values())):
            sd.update(T.load_safetensors(os.path.join(args.model, f)))
    model.load_state_dict(sd, strict=True)
    torch.set_num_threads(os.cpu_count() or 1)

    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt") as f:
        data = [json.loads(line) for line in f]
    # the first sample of each task family first, then the rest in file order
    firsts = {}
    for i, s in enumerate(data):
        firsts.setdefault(s["task"], i)
    order = sorted(firsts.values()) + [i for i in range(len(data)) if i not in firsts.values()]
    samples = [data[i] for i in order[:args.n]]

    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for s in samples:
            ids = prompt_ids(args.redknot, args.model, s, cfg.get("bos_token_id", 0))
            out = os.path.join(tmp, "logits.safetensors")
            subprocess.run([args.redknot, "generate", "--model", args.model, "--prompt-ids",
                            ",".join(map(str, ids)), "--max-tokens", "1", "--logits-out", out],
                           check=True, capture_output=True)
            engine = T.load_safetensors(out)["logits"]                    # [len, vocab], f32
            with torch.no_grad():
                ref = model(torch.tensor([ids]))[0].float()                 # [len, vocab]
            diff = (engine - ref).abs()
            row = dict(id=s.get("id"), task=s["task"], tokens=len(ids), max_abs_diff=float(diff.max()),
                       mean_abs_diff=float(diff.mean()),
                       argmax_agree=float((engine.argmax(-1) == ref.argmax(-1)).float().mean()),
                       last_argmax_equal=bool(engine[-1].argmax() == ref[-1].argmax()))
            print(f"{row['id']} {row['task']:9s} {row['tokens']:5d} tokens: max |diff| {row['max_abs_diff']:.2e}, "
                  f"mean {row['mean_abs_diff']:.2e}, argmax agree {row['argmax_agree']:.4f} of positions, "
                  f"last position {'equal' if row['last_argmax_equal'] else 'DIFFERENT'}", flush=True)
            ok &= row["max_abs_diff"] <= args.tol and row["last_argmax_equal"]
            rows.append(row)
    print(json.dumps(dict(model=args.model, torch=torch.__version__, prompts=rows, ok=ok)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
