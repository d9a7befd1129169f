"""The training-step kernels of one CSA layer at the `small` preset's 16K shapes, taken apart (issue: throughput).

Shapes: B 4 x T 16384 (65,536 tokens, as bench_e2e at 16K), H 8 heads x c 128, window 128, m 4 (S 4096 entries),
k 512 picks, indexer n_I 4 x c_I 64; bf16 inputs. Timed with do_bench (median ms):
    sparse_fwd / sparse_bwd      kernels/sparse_attn (forward; backward = dQ + dKV/dC by fp32 atomics)
    ... picks=random             each query picks k distinct entries uniformly among its visible ones
    ... picks=shared             the 64 queries of a block share one set of picks (most contended atomics)
    ... picks=none               every pick -1: the same launch without the gathers and the dC atomics
    ... window=0                 no window rows: the compressed part alone
    kl_fwd / kl_bwd              kernels/sparse_kl with bf16 kI (the model's dtype) and fp32 kI (fp32 dots)
    compressor_{main,indexer,hca} impl={auto,torch}   Compressor forward + backward as training runs it (fp32
                                 master weights, bf16 autocast, RotaryTable RoPE): main c 128 and indexer c 64
                                 overlapping (m 4), HCA c 128 plain (m 128); d_model 384; `torch` = the naive twin;
                                 `project` = its two projections alone (forward + backward)
    swiglu_moe impl={auto,torch} the routed experts' clamped SwiGLU (N K = 131,072 rows x I 256) forward + backward
    rope_q impl={auto,torch}     RoPE of the queries (B, T, 8, 128) bf16 on their last 64 dims, forward + backward
    rmsnorm_d x={fp32,bf16} impl={auto,torch}   RMSNorm with its fp32 weight of the (B T, 384) residual rows (the
                                 block / final norms), forward + backward (dx and dweight) from a given dy
    rmsnorm_q impl={auto,torch}  the weightless per-head RMSNorm of the queries (B, T, 16, 128) bf16, fwd + bwd
    moe_layer impl={auto,torch}  one score-routed MoE layer of the `small` preset (d 384, 16 experts, top-2, I 256,
                                 shared expert, clamp 10) forward + backward as training runs it (fp32 masters and
                                 residual input, bf16 autocast, balance loss on), grouped dispatch (docs §5.4); `torch`
                                 = the naive SwiGLU twin
    moe_gemms                    its two grouped GEMMs alone (N K = 131,072 rows, bf16) forward + backward: the floor
                                 (moe_layer - moe_gemms - swiglu_moe = router, shared expert and glue)
Writes benchmarks/results/train_kernels.json.

    python benchmarks/bench_train_kernels.py [--T 16384] [--B 4] [--moe-only]
"""
from __future__ import annotations

import argparse

import torch

from common import bench, save
from dsv4_lab.kernels.sparse_attn.triton import sparse_attn_bwd, sparse_attn_fwd
from dsv4_lab.kernels.sparse_kl.triton import sparse_kl_bwd, sparse_kl_fwd


def picks(B, T, S, M, K, how, device):
    """(B, T, K) int32 picks among the visible entries s < (t + 1) // M (-1 where fewer are visible)."""
    if how == "none":
        return torch.full((B, T, K), -1, dtype=torch.int32, device=device)
    out = torch.empty(B, T, K, dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.arange(S, device=device)
    for t0 in range(0, T, 1024):
        t = torch.arange(t0, min(T, t0 + 1024), device=device)
        if how == "shared":                                    # the block's first query decides for all 64
            t = t - t % 64
        r = torch.rand(B, t.numel(), S, generator=g, device=device)
        r = r.masked_fill(s[None, None, :] >= ((t + 1) // M)[None, :, None], -1.0)
        v, i = torch.topk(r, K, dim=-1)
        out[:, t0:t0 + t.numel()] = torch.where(v >= 0, i, -1).int()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--moe-only", action="store_true", help="time the MoE layer (and its GEMMs) only")
    a = ap.parse_args()
    if a.moe_only:
        res = {"shapes": dict(B=a.B, T=a.T), "ms": moe_times(a.B, a.T)}
        print({k: round(v, 3) for k, v in res["ms"].items()}, flush=True)
        print(save("train_kernels_moe", res))
        return
    B, T, H, D, W, M, K, NI, CI = a.B, a.T, 8, 128, 128, 4, 512, 4, 64
    S = T // M
    dev = "cuda"
    bf = dict(device=dev, dtype=torch.bfloat16)
    torch.manual_seed(0)
    q, kv, comp = torch.randn(B, T, H, D, **bf), torch.randn(B, T, D, **bf), torch.randn(B, S, D, **bf)
    sink, scale = torch.randn(H, device=dev), D ** -0.5
    qI, kI = torch.randn(B, T, NI, CI, **bf), torch.randn(B, S, CI, **bf)
    w = torch.randn(B, T, NI, **bf) * (NI * CI) ** -0.5
    res = {"shapes": dict(B=B, T=T, H=H, D=D, W=W, M=M, K=K, NI=NI, CI=CI), "ms": {}}
    ms = res["ms"]
    idx = {h: picks(B, T, S, M, K, h, dev) for h in ("random", "shared", "none")}
    o, lse = sparse_attn_fwd(q, kv, comp, idx["random"], sink, scale, W)
    do = torch.randn_like(o)
    ms["sparse_fwd"] = bench(lambda: sparse_attn_fwd(q, kv, comp, idx["random"], sink, scale, W))["ms"]
    for h in ("random", "shared", "none"):
        ms[f"sparse_bwd picks={h}"] = bench(
            lambda h=h: sparse_attn_bwd(do, q, kv, comp, idx[h], sink, o, lse, scale, W))["ms"]
    ms["sparse_bwd picks=random window=0"] = bench(
        lambda: sparse_attn_bwd(do, q, kv, comp, idx["random"], sink, o, lse, scale, 0))["ms"]
    print({k: round(v, 3) for k, v in ms.items()}, flush=True)
    for name, kk in (("bf16", kI), ("fp32", kI.float())):
        kl, stat, pbuf = sparse_kl_fwd(q, comp, idx["random"], lse, scale, qI, kk, w)
        dkl = torch.full_like(kl, 1.0 / kl.numel())
        ms[f"kl_fwd kI={name}"] = bench(lambda kk=kk: sparse_kl_fwd(q, comp, idx["random"], lse, scale, qI, kk, w))["ms"]
        ms[f"kl_bwd kI={name}"] = bench(
            lambda kk=kk, stat=stat, pbuf=pbuf, dkl=dkl: sparse_kl_bwd(dkl, qI, kk, w, idx["random"], stat, pbuf))["ms"]
        print({k: round(v, 3) for k, v in ms.items()}, flush=True)
    ms.update(compressors(B, T))
    ms.update(swiglu_times(B * T))
    ms.update(rope_times(B, T))
    ms.update(rmsnorm_times(B, T))
    ms.update(moe_times(B, T))
    print({k: round(v, 3) for k, v in ms.items()}, flush=True)
    res["autotuned"] = autotuned_configs()
    print(res["autotuned"], flush=True)
    print(save("train_kernels", res))


def autotuned_configs():
    """The config each autotuned training kernel settled on for its last key (benchmarks/kernel_registers.py gives
    its registers and shared memory)."""
    from dsv4_lab.kernels.compressor_pool import triton as cp
    from dsv4_lab.kernels.sparse_attn import triton as sa
    from dsv4_lab.kernels.sparse_kl import triton as sk
    out = {}
    for mod in (sa, sk, cp):
        for name, obj in vars(mod).items():
            if hasattr(obj, "configs") and hasattr(obj, "cache"):                   # a triton Autotuner
                out[f"{mod.__name__.rsplit('.', 2)[-2]}.{name}"] = {str(k): str(v) for k, v in obj.cache.items()}
    return out


def swiglu_times(N, K=2, inter=256, limit=10.0):
    """The routed experts' activation of one MoE layer (N K rows of gate | up, bf16, routing weights), forward +
    backward: the fused kernel vs the naive twin (ms)."""
    from dsv4_lab.kernels.swiglu import swiglu
    h = torch.randn(N * K, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(N * K, 1, device="cuda", requires_grad=True)
    out = {}
    for impl in ("auto", "torch"):
        def step(impl=impl):
            gate, up = h.chunk(2, dim=-1)
            swiglu(gate, up, limit, w, out_dtype=torch.bfloat16, impl=impl).float().sum().backward()
        out[f"swiglu_moe impl={impl}"] = bench(step, warmup=3, rep=30)["ms"]
    return out


def moe_times(B, T):
    """One MoE layer of the `small` preset (score-routed, layer 3), forward + backward under bf16 autocast with the
    balance loss, kernels auto vs torch; and its two grouped GEMMs alone (ms)."""
    from dsv4_lab.config import ModelConfig
    from dsv4_lab.moe import MoE
    out = {}
    x = torch.randn(B, T, 384, device="cuda", requires_grad=True)
    gy = torch.randn(B, T, 384, device="cuda")
    one = torch.ones((), device="cuda")
    for impl in ("auto", "torch"):
        moe = MoE(ModelConfig.from_preset("small", kernels=impl), 3).cuda().train()

        def step(moe=moe):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = moe(x)
            torch.autograd.backward([y, moe._aux["balance_loss"]], [gy, one])
        out[f"moe_layer impl={impl}"] = bench(step, warmup=3, rep=30)["ms"]
    N, K, d, inter, G = B * T, 2, 384, 256, 16
    grp = torch.randint(0, G, (N * K,), device="cuda").sort().values
    offs = torch.searchsorted(grp, torch.arange(1, G + 1, device="cuda"), out_int32=True)
    xs = torch.randn(N * K, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    hs = torch.randn(N * K, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w13 = torch.randn(G, 2 * inter, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(G, d, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g13, g2 = torch.randn(N * K, 2 * inter, **dict(device="cuda", dtype=torch.bfloat16)), torch.randn_like(xs)

    def gemms():
        mm = torch._grouped_mm
        torch.autograd.backward([mm(xs, w13.transpose(-2, -1), offs=offs), mm(hs, w2.transpose(-2, -1), offs=offs)],
                                [g13, g2])
    out["moe_gemms"] = bench(gemms, warmup=3, rep=30)["ms"]
    return out


def rope_times(B, T, H=8, D=128, r=64):
    """RoPE of the queries (B, T, H, D) bf16 on their last r dims, forward + backward: the fused kernel vs the naive
    twin (ms)."""
    from dsv4_lab.rope import RotaryTable
    x = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T, device="cuda")
    out = {}
    for impl in ("auto", "torch"):
        tab = RotaryTable(r, T, 10000.0, impl=impl).cuda()
        out[f"rope_q impl={impl}"] = bench(lambda tab=tab: tab(x, pos).float().sum().backward(), warmup=3,
                                           rep=30)["ms"]
    return out


def rmsnorm_times(B, T, d=384, H=16, D=128):
    """RMSNorm forward + backward (from a fixed dy): the fused kernel vs the naive twin (ms). The (B T, d) rows with
    the fp32 weight (the block and final norms; the residual stream fp32 or bf16) and the weightless per-head norm
    of the (B, T, H, D) bf16 queries."""
    from dsv4_lab.layers import RMSNorm, rms_norm
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(B * T, d, device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn_like(x)
        for impl in ("auto", "torch"):
            norm = RMSNorm(d, impl=impl).cuda()
            out[f"rmsnorm_d x={'fp32' if dt == torch.float32 else 'bf16'} impl={impl}"] = bench(
                lambda norm=norm: norm(x).backward(dy), warmup=3, rep=30)["ms"]
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dq = torch.randn_like(q)
    for impl in ("auto", "torch"):
        out[f"rmsnorm_q impl={impl}"] = bench(lambda impl=impl: rms_norm(q, 1e-6, impl).backward(dq), warmup=3,
                                              rep=30)["ms"]
    return out


def compressors(B, T, d=384):
    """Forward + backward of the three compressors of a `small` training step, kernels auto vs torch (ms)."""
    from dsv4_lab.attention.compressor import Compressor
    from dsv4_lab.rope import RotaryTable
    out = {}
    u = torch.randn(B, T, d, device="cuda", requires_grad=True)
    for name, c, m, overlap in (("main", 128, 4, True), ("indexer", 64, 4, True), ("hca", 128, 128, False)):
        rope = RotaryTable(64, T, 10000.0).cuda()
        for impl in ("auto", "torch"):
            comp = Compressor(d, c, m, overlap, impl=impl).cuda()

            def step(comp=comp, rope=rope):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = comp(u, rope)
                y.float().square().mean().backward()
            out[f"compressor_{name} impl={impl}"] = bench(step, warmup=3, rep=30)["ms"]

        def proj(comp=comp):                                  # the two projections alone (C, Z in fp32)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                C, Z = comp.project(u)
            (C.square().mean() + Z.square().mean()).backward()
        out[f"compressor_{name} project"] = bench(proj, warmup=3, rep=30)["ms"]
    return out


if __name__ == "__main__":
    main()
