#!/usr/bin/env python3
"""Peer for bench/cuda_model_bench.cu: Hugging Face transformers LlamaForCausalLM /
MistralForCausalLM / Qwen3ForCausalLM (attn_implementation="sdpa", bf16, random weights made on
the GPU) on the same shapes as the bench (llama3-8b, mistral-7b, qwen3-32b, llama3.3-70b),
dense prefill TTFT of one T-token prompt with use_cache=True (the peer fills its KV cache, as a
real prefill does) and logits_to_keep=1.
Wall time from the forward call to the last token's logits on the host, after --warmup runs,
median of --reps; the same table format as the RedKnot bench.

  gpu-model-peer.py [--shapes llama3-8b,mistral-7b] [--lengths 8192,32768] [--layers N]
                    [--warmup 2] [--reps 3]
  gpu-model-peer.py --combine OURS_LOG PEER_LOG   # the ours/peer ratio table (no torch needed)
"""
import argparse
import gc
import math
import re
import sys
import time

# The shapes the bench resolves (keep in sync): llama3-8b and mistral-7b from redknot's
# preset_config (src/model/random_checkpoint.cc), the others from the config.json table of
# src/loader/model_shapes.cc. Qwen3ForCausalLM has the per-head q/k RMSNorm the bench adds.
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
SHAPES = {
    "llama3-8b": dict(arch="llama", vocab=128256, hidden=4096, ffn=14336, layers=32, heads=32,
                      kv_heads=8, head_dim=128, theta=500000.0, max_pos=131072, eps=1e-5,
                      rope=LLAMA3_ROPE),
    "mistral-7b": dict(arch="mistral", vocab=32768, hidden=4096, ffn=14336, layers=32, heads=32,
                       kv_heads=8, head_dim=128, theta=1000000.0, max_pos=32768, eps=1e-5,
                       rope=None),
    "qwen3-32b": dict(arch="qwen3", vocab=151936, hidden=5120, ffn=25600, layers=64, heads=64,
                      kv_heads=8, head_dim=128, theta=1000000.0, max_pos=40960, eps=1e-6,
                      rope=None),
    "llama3.3-70b": dict(arch="llama", vocab=128256, hidden=8192, ffn=28672, layers=80, heads=64,
                         kv_heads=8, head_dim=128, theta=500000.0, max_pos=131072, eps=1e-5,
                         rope=LLAMA3_ROPE),
}
HEADER = "| shape | T | chunk | TTFT ms | TFLOP/s |"


def prefill_flops(s, T):
    """Same count as redknot's prefill_flops (a multiply-add is 2): projections, FFN, causal
    attention QK^T and PV over every earlier position, the lm_head for one row (norms, Qwen3's
    q/k norm included, are not counted there either)."""
    H, F, hd = s["hidden"], s["ffn"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    per_tok = 2.0 * H * (q + 2 * kv) + 2.0 * q * H + 6.0 * H * F
    attn = 4.0 * hd * s["heads"] * T * (T + 1) / 2
    return s["layers"] * (per_tok * T + attn) + 2.0 * H * s["vocab"]


def make_config(s):
    import inspect
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen3": Qwen3Config}[s["arch"]]
    kw = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
              num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
              num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
              max_position_embeddings=s["max_pos"], rms_norm_eps=s["eps"],
              tie_word_embeddings=False, use_cache=True)
    # All heads global, as in the RedKnot run.
    if s["arch"] == "mistral":
        kw["sliding_window"] = None
    elif s["arch"] == "qwen3":
        kw["use_sliding_window"] = False
    params = inspect.signature(cls.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5: theta lives in rope_parameters
        rp = {"rope_type": "default", "rope_theta": s["theta"]}
        if s["rope"]:
            rp.update(s["rope"])
        kw["rope_parameters"] = rp
    else:
        kw["rope_theta"] = s["theta"]
        if s["rope"]:
            kw["rope_scaling"] = dict(s["rope"])
    return cls(**kw)


def expected_inv_freq(s):
    """RoPE inverse frequencies after llama3 scaling, to check the config took."""
    d = s["head_dim"]
    inv = [1.0 / (s["theta"] ** (i / d)) for i in range(0, d, 2)]
    r = s["rope"]
    if not r:
        return inv
    lo = r["original_max_position_embeddings"] / r["low_freq_factor"]
    hi = r["original_max_position_embeddings"] / r["high_freq_factor"]
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < hi:
            out.append(f)
        elif wl > lo:
            out.append(f / r["factor"])
        else:
            sm = (r["original_max_position_embeddings"] / wl - r["low_freq_factor"]) / (
                r["high_freq_factor"] - r["low_freq_factor"])
            out.append((1 - sm) * f / r["factor"] + sm * f)
    return out


def build_model(s):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = make_config(s)
    # Parameters are made and initialised on the GPU (8B params on the CPU take minutes).
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype != torch.bfloat16:
        model = model.to(device="cuda", dtype=torch.bfloat16)
    model.eval()
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv = getattr(rot, "inv_freq", None)
    if inv is not None:
        exp = torch.tensor(expected_inv_freq(s), dtype=torch.float64)
        err = ((inv.double().cpu() - exp).abs() / exp).max().item()
        print(f"  rope inv_freq vs expected: max rel err {err:.2e}"
              + ("" if err < 1e-2 else "  WARNING: rope config did not take"))
    print(f"  {type(model).__name__}, attn_implementation: "
          f"{getattr(model.config, '_attn_implementation', '?')}")
    return model


def run_peer(args):
    import torch
    import transformers

    print("# peer: torch", torch.__version__, "transformers", transformers.__version__,
          torch.cuda.get_device_name(0))
    free, total = torch.cuda.mem_get_info()
    print(f"# card: {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free at start")
    print(f"# bf16 random weights, sdpa, use_cache=True, logits_to_keep=1; warm-up {args.warmup}, "
          f"median of {args.reps}")
    rows, errors = [], []
    for name in args.shapes.split(","):
        s = dict(SHAPES[name])
        if args.layers > 0:
            s["layers"] = args.layers
        model = None
        try:
            t0 = time.perf_counter()
            model = build_model(s)
            torch.cuda.synchronize()
            n = sum(p.numel() for p in model.parameters())
            free, _ = torch.cuda.mem_get_info()
            print(f"## {name}: {n / 1e9:.2f}B params, built on the GPU in "
                  f"{time.perf_counter() - t0:.1f} s, {free / 2**30:.1f} GiB free")
            for T in (int(x) for x in args.lengths.split(",")):
                try:
                    g = torch.Generator(device="cuda").manual_seed(T)
                    ids = torch.randint(0, s["vocab"], (1, T), device="cuda", generator=g)

                    def once():
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        with torch.inference_mode():
                            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                            logits = out.logits[0, -1].float().cpu()  # waits for the GPU
                        ms = (time.perf_counter() - t) * 1e3
                        del out  # the KV cache (4 GiB at 32K) goes before the next run
                        if not torch.isfinite(logits).all():
                            raise RuntimeError("non-finite logits")
                        return ms

                    for _ in range(args.warmup):
                        once()
                    ts = sorted(once() for _ in range(args.reps))
                    ms = ts[len(ts) // 2]
                    tf = prefill_flops(s, T) / (ms * 1e-3) / 1e12
                    print(f"ttft {name} T={T}: {ms:.1f} ms (min {ts[0]:.1f}), {tf:.0f} TFLOP/s, "
                          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated")
                    rows.append(f"| {name} | {T} | whole | {ms:.1f} | {tf:.0f} |")
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{name} T={T}: {type(e).__name__}: {e}")
                    print("ttft", name, T, "FAILED:", errors[-1])
                gc.collect()
                torch.cuda.empty_cache()
                sys.stdout.flush()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {type(e).__name__}: {e}")
            print(name, "FAILED:", errors[-1])
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print("\n## TTFT (peer: transformers, sdpa, bf16)\n")
    print(HEADER + "\n|---|---|---|---|---|")
    print("\n".join(rows))
    for e in errors:
        print("ERROR", e)
    return 1 if errors else 0


def read_table(path):
    """Rows (shape, T, chunk, ms) of the TTFT table in a log."""
    out, inside = [], False
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.strip() == HEADER:
            inside = True
            continue
        if inside:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|"):
                inside = False
            elif len(cells) == 5 and re.fullmatch(r"\d+", cells[1]):
                out.append((cells[0], int(cells[1]), cells[2], float(cells[3])))
    return out


def combine(ours_log, peer_log):
    ours, peer = read_table(ours_log), read_table(peer_log)
    peer_ms = {(s, T): ms for s, T, _, ms in peer}
    print("\n## TTFT, RedKnot vs transformers (same card, same run; bar: ours/peer <= 1.15)\n")
    print("| shape | T | our chunk | ours ms | peer ms | ours/peer | bar |")
    print("|---|---|---|---|---|---|---|")
    for s, T, chunk, ms in ours:
        p = peer_ms.get((s, T))
        if p is None:
            print(f"| {s} | {T} | {chunk} | {ms:.1f} | n/a | n/a | n/a |")
        else:
            r = ms / p
            print(f"| {s} | {T} | {chunk} | {ms:.1f} | {p:.1f} | {r:.3f} | "
                  f"{'met' if r <= 1.15 else 'NOT met'} |")
    for s, T, _, ms in peer:
        if not any(o[0] == s and o[1] == T for o in ours):
            print(f"| {s} | {T} | n/a | n/a | {ms:.1f} | n/a | n/a |")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3-8b,mistral-7b")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--layers", type=int, default=0, help="> 0: override the layer count")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--combine", nargs=2, metavar=("OURS_LOG", "PEER_LOG"))
    args = ap.parse_args()
    if args.combine:
        return combine(*args.combine)
    for name in args.shapes.split(","):
        if name not in SHAPES:
            ap.error(f"unknown shape {name} (known: {', '.join(SHAPES)})")
    return run_peer(args)


if __name__ == "__main__":
    sys.exit(main())
