"""HCA core attention (T1, T7): our Triton kernel vs FlexAttention (compiled, block mask over concat(compressed,
raw)), the naive PyTorch path, and dense SDPA (bench_dense.py). H 16, d 128, window 128, m' 128, bf16, B = 1.
Work = 4 H d per visible (query, entry) pair (window + compressed)."""
from __future__ import annotations

import time

import torch

from common import bench, bench_graph, ceilings, safe, save
from dsv4_lab.kernels.hca_attn.naive import hca_attn_naive
from dsv4_lab.kernels.hca_attn.triton import hca_attn_fwd, hca_attn_triton

H, D, W, R = 16, 128, 128, 128


def pairs(N, q_offset=0, T=None):
    T = N if T is None else T
    t = torch.arange(T, dtype=torch.float64) + q_offset
    return float(((t + 1) // R).sum() + torch.clamp(t + 1, max=W).sum())


def inputs(N, grad=False):
    g = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, N, H, D, **g, requires_grad=grad)
    kv = torch.randn(1, N, D, **g, requires_grad=grad)
    comp = torch.randn(1, N // R, D, **g, requires_grad=grad)
    sink = torch.randn(H, device="cuda", requires_grad=grad)
    return q, kv, comp, sink


def ours_fwd(N):
    q, kv, comp, sink = inputs(N)
    r = bench(lambda: hca_attn_fwd(q, kv, comp, sink, D ** -0.5, W, R), warmup=10, rep=100)
    f = 4 * H * D * pairs(N)
    r.update(tflops=f / (r["ms"] * 1e-3) / 1e12, useful_gflop=f / 1e9)
    return r


def ours_fwd_bwd(N):
    q, kv, comp, sink = inputs(N, grad=True)
    go = torch.randn_like(q)

    def step():
        o = hca_attn_triton(q, kv, comp, sink, D ** -0.5, W, R)
        torch.autograd.grad(o, (q, kv, comp, sink), go)
    r = bench(step, warmup=3, rep=100)
    f = 3.5 * 4 * H * D * pairs(N)                                       # fwd + bwd (2.5x fwd) FLOPs
    r.update(tflops=f / (r["ms"] * 1e-3) / 1e12)
    return r


def naive_fwd(N):
    q, kv, comp, sink = inputs(N)
    return bench(lambda: hca_attn_naive(q, kv, comp, sink, D ** -0.5, W, R), warmup=2, rep=50)


def flex_fwd(N):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    S = N // R
    Sp = ((S + 127) // 128) * 128
    q, kv, comp, _ = inputs(N)
    kv_all = torch.cat([comp, comp.new_zeros(1, Sp - S, D), kv], 1)[:, None]   # (1, 1, Sp + N, D)

    def mask_mod(b, h, q_idx, kv_idx):
        c_vis = kv_idx < (q_idx + 1) // R
        j = kv_idx - Sp
        w_vis = (kv_idx >= Sp) & (j <= q_idx) & (j > q_idx - W)
        return c_vis | w_vis
    bm = create_block_mask(mask_mod, None, None, N, Sp + N, device="cuda", _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    qf = q.transpose(1, 2)
    fn = lambda: flex(qf, kv_all, kv_all, block_mask=bm, enable_gqa=True, scale=D ** -0.5)  # noqa: E731
    fn()
    r = bench(fn, warmup=5, rep=100)
    f = 4 * H * D * pairs(N)
    r.update(tflops=f / (r["ms"] * 1e-3) / 1e12, note="no sink (flex has no denominator-only sink); same mask")
    return r


def decode(N, B=1, path="split"):
    """One decode token per sequence at position N - 1, CUDA-graph replay. path 'split' = what hca_attn_fwd takes for
    few queries without grad (split-KV, hca_attn/triton_decode.py); 'query' = triton.py's query-major kernel (forced
    by q.requires_grad). bytes = compressed entries + window rows, read once per batch element (kernels.md §8.4)."""
    g = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, 1, H, D, **g, requires_grad=path == "query")
    kv = torch.randn(B, N, D, **g)
    comp = torch.randn(B, N // R, D, **g)
    sink = torch.randn(H, device="cuda")
    fn = lambda: hca_attn_fwd(q, kv, comp, sink, D ** -0.5, W, R, q_offset=N - 1)  # noqa: E731
    fn()
    r = bench_graph(fn)
    r.update(us=r["ms"] * 1e3, B=B, path=path, bytes=B * (N // R + W) * D * 2)
    r["tb_s"] = r["bytes"] / (r["ms"] * 1e-3) / 1e12
    r["pct_copy"] = 100 * r["tb_s"] / ceilings()["copy_tb_s"]
    return r


def main(out_dir=None, Ns=(8192, 32768, 131072), bwd_Ns=(8192,), naive_Ns=(8192,), decode_Ns=(131072, 1048576),
         flex_Ns=(8192, 32768, 131072)):
    res = {"shapes": {"H": H, "D": D, "window": W, "ratio": R, "B": 1, "dtype": "bf16"},
           "prefill": {}, "fwd_bwd": {}, "decode": {}}
    for N in Ns:
        res["prefill"][f"triton_{N}"] = safe(ours_fwd, N)
        if N in naive_Ns:
            res["prefill"][f"naive_{N}"] = safe(naive_fwd, N)
        print("hca", N, {k: v.get("ms") for k, v in res["prefill"].items() if k.endswith(str(N))}, flush=True)
        save("hca", res, out_dir)
        torch.cuda.empty_cache()
    for N in decode_Ns:                  # split_* / query_kernel_*: B = 1; split_b64_*: B = 64; triton_*: best at B = 1
        dec = res["decode"]
        dec[f"split_{N}"] = safe(decode, N, 1, "split")
        dec[f"query_kernel_{N}"] = safe(decode, N, 1, "query")
        dec[f"split_b64_{N}"] = safe(decode, N, 64, "split")
        torch.cuda.empty_cache()
        ok = [dec[k] for k in (f"split_{N}", f"query_kernel_{N}") if "us" in dec[k]]
        dec[f"triton_{N}"] = min(ok, key=lambda r: r["us"]) if ok else dec[f"split_{N}"]
        print("hca decode", N, {k: v.get("us", v.get("error")) for k, v in dec.items() if k.endswith(f"_{N}")},
              "B=64", dec[f"split_b64_{N}"].get("tb_s"), "TB/s", flush=True)
        save("hca", res, out_dir)
    for N in flex_Ns:
        t0 = time.time()
        res["prefill"][f"flex_{N}"] = safe(flex_fwd, N)
        print("hca flex", N, res["prefill"][f"flex_{N}"], f"{time.time() - t0:.1f} s", flush=True)
        save("hca", res, out_dir)
    for N in bwd_Ns:
        res["fwd_bwd"][f"triton_{N}"] = safe(ours_fwd_bwd, N)
        print("hca fwd+bwd", N, res["fwd_bwd"][f"triton_{N}"], flush=True)
        save("hca", res, out_dir)
    save("hca", res, out_dir)
    return res


if __name__ == "__main__":
    main()
