#!/usr/bin/env python3
"""Peer baseline for bench/cuda_attention_bench.cu: torch SDPA (and a torch GEMM and a device
copy) on the same shapes, timed with CUDA events, 3 warm-ups, median. Run in the same device
call as the RedKnot bench (scripts/gpu-cuda-bench.sh)."""
import torch
import torch.nn.functional as F


def med_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


dev = "cuda"
print("torch", torch.__version__, torch.cuda.get_device_name(0))
rows = []
x = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
y = torch.empty_like(x)
ms = med_ms(lambda: y.copy_(x), 10)
rows.append(f"| copy 2 GiB | d2d | {ms:.3f} ms | {2 * x.numel() / ms / 1e6:.0f} GB/s (read+write) | |")
del x, y
hq, hkv, d = 32, 8, 128
for T in (8192, 32768):
    q = torch.randn(1, hq, T, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, T, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, T, d, device=dev, dtype=torch.bfloat16)
    fl = 4.0 * d * hq * T * (T + 1) / 2
    best = None
    for name, fn in (
        ("gqa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        ("expanded kv", None),
    ):
        if fn is None:
            ke, ve = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            fn = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        try:
            ms = med_ms(fn, 10 if T > 10000 else 20)
        except Exception as e:  # noqa: BLE001
            print("sdpa", name, "failed:", e)
            continue
        print(f"sdpa prefill T={T} {name}: {ms:.3f} ms")
        if best is None or ms < best[0]:
            best = (ms, name)
    rows.append(f"| torch SDPA prefill T={T} | dense causal ({best[1]}) | {best[0]:.3f} ms | {fl / best[0] / 1e9:.0f} TFLOP/s | |")
    del q, k, v
    torch.cuda.empty_cache()
B, L = 16, 32768
q = torch.randn(B, hq, 1, d, device=dev, dtype=torch.bfloat16)
k = torch.randn(B, hkv, L, d, device=dev, dtype=torch.bfloat16)
v = torch.randn(B, hkv, L, d, device=dev, dtype=torch.bfloat16)
by = 2 * k.numel() * 2 + 2 * q.numel() * 2
best = None
for name in ("gqa", "expanded kv"):
    if name == "gqa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        # A GQA decode as one query row per kv head group: [B, hkv, group, d] x [B, hkv, L, d].
        qg = q.view(B, hkv, hq // hkv, d)
        fn = lambda: F.scaled_dot_product_attention(qg, k, v)
    try:
        ms = med_ms(fn, 50)
    except Exception as e:  # noqa: BLE001
        print("sdpa decode", name, "failed:", e)
        continue
    print(f"sdpa decode {name}: {ms:.3f} ms")
    if best is None or ms < best[0]:
        best = (ms, name)
rows.append(f"| torch SDPA decode 32K x16 | dense ({best[1]}) | {best[0]:.3f} ms | {by / best[0] / 1e6:.0f} GB/s of {by / 1e6:.1f} MB | |")
del q, k, v
for m in (16, 8192):
    a = torch.randn(m, 8192, device=dev, dtype=torch.bfloat16)
    w = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    bias = torch.randn(8192, device=dev, dtype=torch.bfloat16)
    ms = med_ms(lambda: F.linear(a, w, bias), 20)
    rows.append(f"| torch F.linear+bias {m}x8192x8192 | bf16 | {ms:.3f} ms | {2 * m * 8192 * 8192 / ms / 1e9:.0f} TFLOP/s | |")
print("\n| case | profile | time | rate | check |\n|---|---|---|---|---|")
print("\n".join(rows))
