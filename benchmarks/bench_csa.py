"""CSA (T2-T6): fused indexer + top-k and the sparse attention kernel vs the naive path (+ torch.topk) and dense
SDPA (bench_dense.py). H 16, d 128, m 4, k 512, window 128, H_I 4 x d_I 64, bf16, B = 1. The compressor is not
included (≈ 0.1 ms at 128K, kernels.md §8.2). Gather bandwidth counts each loaded 256-B row once per query."""
from __future__ import annotations

import torch

from common import bench, bench_graph, safe, save
from dsv4_lab.kernels.indexer_topk.naive import indexer_topk_naive
from dsv4_lab.kernels.indexer_topk.triton import indexer_topk_triton
from dsv4_lab.kernels.sparse_attn.naive import sparse_attn_naive
from dsv4_lab.kernels.sparse_attn.triton import sparse_attn_fwd, sparse_attn_triton

H, D, M, K, W, HI, DI = 16, 128, 4, 512, 128, 4, 64
BF = dict(device="cuda", dtype=torch.bfloat16)


def indexer_inputs(N, T=None):
    T = N if T is None else T
    qI = torch.randn(1, T, HI, DI, **BF)
    kI = torch.randn(1, N // M, DI, **BF)
    w = torch.randn(1, T, HI, **BF) * (DI * HI) ** -0.5
    return qI, kI, w


def idx_pairs(N):
    t = torch.arange(N, dtype=torch.float64)
    return float(torch.clamp((t + 1) // M, max=K).sum()), float(torch.clamp(t + 1, max=W).sum()), \
        float(((t + 1) // M).sum())


def indexer_fused(N):
    qI, kI, w = indexer_inputs(N)
    r = bench(lambda: indexer_topk_triton(qI, kI, w, K, M), warmup=3, rep=100)
    sel, win, allv = idx_pairs(N)
    r.update(tflops=2 * HI * DI * allv / (r["ms"] * 1e-3) / 1e12, useful_gflop=2 * HI * DI * allv / 1e9)
    return r


def indexer_torch(N):
    qI, kI, w = indexer_inputs(N)
    r = bench(lambda: indexer_topk_naive(qI, kI, w, K, M, chunk=2048, use_topk=True), warmup=2, rep=100)
    r["note"] = "naive scores in query chunks of 2048 + torch.topk (never the full [N, N/4] matrix)"
    return r


def sparse_inputs(N, grad=False):
    q = torch.randn(1, N, H, D, **BF, requires_grad=grad)
    kv = torch.randn(1, N, D, **BF, requires_grad=grad)
    comp = torch.randn(1, N // M, D, **BF, requires_grad=grad)
    sink = torch.randn(H, device="cuda", requires_grad=grad)
    qI, kI, w = indexer_inputs(N)
    idx = indexer_topk_triton(qI, kI, w, K, M)
    return q, kv, comp, idx, sink


def sparse_fwd(N):
    q, kv, comp, idx, sink = sparse_inputs(N)
    r = bench(lambda: sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W), warmup=5, rep=100)
    sel, win, _ = idx_pairs(N)
    s = r["ms"] * 1e-3
    r.update(tflops=4 * H * D * (sel + win) / s / 1e12, gather_tb_s=(sel + win) * D * 2 / s / 1e12,
             gather_sel_only_tb_s=sel * D * 2 / s / 1e12)
    return r


def sparse_fwd_bwd(N):
    q, kv, comp, idx, sink = sparse_inputs(N, grad=True)
    go = torch.randn_like(q)

    def step():
        o = sparse_attn_triton(q, kv, comp, idx, sink, D ** -0.5, W)
        torch.autograd.grad(o, (q, kv, comp, sink), go)
    return bench(step, warmup=3, rep=100)


def sparse_naive(N):
    q, kv, comp, idx, sink = sparse_inputs(N)
    return bench(lambda: sparse_attn_naive(q, kv, comp, idx, sink, D ** -0.5, W, chunk=2048), warmup=2, rep=50)


def decode(N):
    S = N // M
    qI, kI, w = indexer_inputs(N, T=1)
    q = torch.randn(1, 1, H, D, **BF)
    kv = torch.randn(1, N, D, **BF)
    comp = torch.randn(1, S, D, **BF)
    sink = torch.randn(H, device="cuda")
    out = {}
    idx = indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1)
    r = bench_graph(lambda: indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1), reps=20)
    out["indexer_fused_us"] = r["ms"] * 1e3
    r = bench_graph(lambda: indexer_topk_naive(qI, kI, w, K, M, q_offset=N - 1, use_topk=True), reps=20)
    out["indexer_torch_topk_us"] = r["ms"] * 1e3
    r = bench_graph(lambda: sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W, q_offset=N - 1))
    out["sparse_attn_us"] = r["ms"] * 1e3
    out["csa_decode_us"] = min(out["indexer_fused_us"], out["indexer_torch_topk_us"]) + out["sparse_attn_us"]
    out["indexer_key_bytes"] = S * DI * 2
    return out


def main(out_dir=None, Ns=(8192, 32768, 131072), bwd_Ns=(8192,), naive_Ns=(8192,), decode_Ns=(131072, 1048576)):
    res = {"shapes": {"H": H, "D": D, "m": M, "topk": K, "window": W, "HI": HI, "DI": DI, "B": 1, "dtype": "bf16"},
           "indexer": {}, "sparse": {}, "fwd_bwd": {}, "decode": {}, "csa_prefill": {}}
    for N in Ns:
        res["indexer"][f"fused_{N}"] = safe(indexer_fused, N)
        res["indexer"][f"torch_topk_{N}"] = safe(indexer_torch, N)
        res["sparse"][f"triton_{N}"] = safe(sparse_fwd, N)
        if N in naive_Ns:
            res["sparse"][f"naive_{N}"] = safe(sparse_naive, N)
        a, b = res["indexer"][f"fused_{N}"].get("ms"), res["sparse"][f"triton_{N}"].get("ms")
        res["csa_prefill"][f"triton_{N}"] = {"ms": a + b} if a and b else {"error": "component missing"}
        print("csa", N, res["indexer"][f"fused_{N}"], res["indexer"][f"torch_topk_{N}"], res["sparse"][f"triton_{N}"],
              flush=True)
        save("csa", res, out_dir)
        torch.cuda.empty_cache()
    for N in decode_Ns:
        res["decode"][f"{N}"] = safe(decode, N)
        print("csa decode", N, res["decode"][f"{N}"], flush=True)
        save("csa", res, out_dir)
    for N in bwd_Ns:
        res["fwd_bwd"][f"triton_{N}"] = safe(sparse_fwd_bwd, N)
        print("csa fwd+bwd", N, res["fwd_bwd"][f"triton_{N}"], flush=True)
        save("csa", res, out_dir)
    save("csa", res, out_dir)
    return res


if __name__ == "__main__":
    main()
