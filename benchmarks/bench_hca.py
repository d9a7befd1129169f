"""HCA core attention (T1, T7): our Triton kernel vs FlexAttention (compiled, block mask over concat(compressed,
raw)), the naive PyTorch path, and dense SDPA (bench_dense.py). H 16, d 128, window 128, m' 128, bf16, B = 1.
Work = 4 H d per visible (query, entry) pair (window + compressed).

prefill keys: triton_N = the library's kernel (autotuned), triton_cfg_<name>_N = one fixed configuration of the
current kernel (which config wins), flex_N = FlexAttention (flex_hca.py; ms without the sink pass, sink_ms with it, compile_s;
each shape compiled in a subprocess cut off after FLEX_TIMEOUT_S), naive_N. max_abs_err_vs_naive on the first
queries and on the last 2048 (the latter reach the mask-free compressed loop)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


# fixed configurations of the current prefill kernel timed next to the autotuned one (BLOCK_M 64 = 4 tokens x 16
# heads). On the H200: m64_s64_w4_st3 best at 32K / 128K; BLOCK_M 128 with BLOCK_S 128 (2 or 3
# stages) and BLOCK_M 256 were 8-30 % slower and are no longer timed.
FWD_CFGS = {
    "m64_s64_w4_st3": dict(BLOCK_M=64, BLOCK_S=64, BLOCK_J=64, num_warps=4, num_stages=3),
    "m64_s128_w4_st3": dict(BLOCK_M=64, BLOCK_S=128, BLOCK_J=64, num_warps=4, num_stages=3),
    "m64_s64_w4_st4": dict(BLOCK_M=64, BLOCK_S=64, BLOCK_J=64, num_warps=4, num_stages=4),
    "m64_s64_w4_st2": dict(BLOCK_M=64, BLOCK_S=64, BLOCK_J=64, num_warps=4, num_stages=2),
    "m128_s64_w4_st3": dict(BLOCK_M=128, BLOCK_S=64, BLOCK_J=64, num_warps=4, num_stages=3),
    "m128_s64_w8_st3": dict(BLOCK_M=128, BLOCK_S=64, BLOCK_J=64, num_warps=8, num_stages=3),
}
FLEX_TIMEOUT_S = int(os.environ.get("FLEX_TIMEOUT_S", "150"))   # per shape: start + block mask + compile + timing


def _check(fn, q, kv, comp, sink, n=2048):
    """max |o - naive| (fp32 naive of the bf16 inputs) on the first n and on the last n queries."""
    o = fn(q, kv, comp, sink, D ** -0.5, W, R)
    o = o[0] if isinstance(o, tuple) else o
    N = q.shape[1]
    ref_a = hca_attn_naive(q[:, :n].float(), kv.float(), comp.float(), sink, D ** -0.5, W, R)
    ref_b = hca_attn_naive(q[:, N - n:].float(), kv.float(), comp.float(), sink, D ** -0.5, W, R, q_offset=N - n)
    return max((o[:, :n].float() - ref_a).abs().max().item(), (o[:, N - n:].float() - ref_b).abs().max().item())


def ours_fwd(N, cfg=None, check=False):
    """hca_attn_fwd, autotuned or with one fixed cfg."""
    q, kv, comp, sink = inputs(N)
    fn = (lambda *a: hca_attn_fwd(*a, cfg=cfg)) if cfg is not None else hca_attn_fwd
    t0 = time.time()
    fn(q, kv, comp, sink, D ** -0.5, W, R)
    torch.cuda.synchronize()
    first_s = time.time() - t0
    r = bench(lambda: fn(q, kv, comp, sink, D ** -0.5, W, R), warmup=10, rep=100)
    f = 4 * H * D * pairs(N)
    r.update(tflops=f / (r["ms"] * 1e-3) / 1e12, useful_gflop=f / 1e9, first_call_s=first_s)
    if check:
        r["max_abs_err_vs_naive"] = _check(fn, q, kv, comp, sink)
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
    """FlexAttention baseline (flex_hca.py) for one N in a subprocess: a compile that hangs is cut off after
    FLEX_TIMEOUT_S and recorded as an error instead of eating the device call."""
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "flex.json")
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, os.path.join(here, "flex_hca.py"), "--N", str(N), "--json", out],
                               capture_output=True, text=True, timeout=FLEX_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-300:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"error": f"timeout: flex subprocess (start + block mask + compile + timing) did not finish within "
                             f"{FLEX_TIMEOUT_S} s; its output: {tail!r}"}
        if not os.path.exists(out):
            return {"error": f"flex subprocess rc={p.returncode}: {(p.stdout + p.stderr)[-400:]}"}
        r = json.load(open(out))
    if "error" in r:
        return r
    ns, sk = r["nosink"], r["sink"]
    return {"ms": ns["ms"], "p10_ms": ns["p10_ms"], "p90_ms": ns["p90_ms"], "tflops": ns["tflops"],
            "sink_ms": sk["ms"], "sink_tflops": sk["tflops"], "compile_s": r["compile_s"],
            "block_mask_s": r["block_mask_s"], "sink_fix_compile_s": r.get("sink_fix_compile_s"),
            "subprocess_s": time.time() - t0, "blocks": r["blocks"],
            "max_abs_err_vs_naive_first4k": r.get("max_abs_err_vs_naive_first4k"),
            "note": "ms: flex_attention alone (no sink: Flex has no denominator-only sink; same mask, same KV = "
                    "concat(compressed, zero pad to 128, raw)); sink_ms: + exact sink pass o * sigmoid(lse - sink) "
                    "(torch.compile'd pointwise; what equals our kernel's output); static BlockMask from analytic "
                    "block indices"}


def decode(N, B=1, path="split"):
    """One decode token per sequence at position N - 1, CUDA-graph replay. path 'split' = what hca_attn_fwd takes for
    few queries without grad (split-KV, hca_attn/triton_decode.py); 'query' = triton.py's query-major kernel (forced
    by q.requires_grad). bytes = compressed entries + window rows, read once per batch element (docs/kernels.md §8.4)."""
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


def main(out_dir=None, Ns=(8192, 32768, 131072), bwd_Ns=(8192, 32768), naive_Ns=(8192,), decode_Ns=(131072, 1048576),
         flex_Ns=(8192, 32768, 131072), cfg_Ns=(8192, 32768, 131072), check_Ns=(32768,)):
    res = {"shapes": {"H": H, "D": D, "window": W, "ratio": R, "B": 1, "dtype": "bf16"},
           "prefill": {}, "fwd_bwd": {}, "decode": {}}
    pre = res["prefill"]
    ceilings()                           # also warms the GPU up (the first timed kernel ran at idle clocks before)
    for N in Ns:
        pre[f"triton_{N}"] = safe(ours_fwd, N, check=N in check_Ns)
        if N in cfg_Ns:
            for name, cfg in FWD_CFGS.items():
                pre[f"triton_cfg_{name}_{N}"] = safe(ours_fwd, N, cfg=cfg)
        if N in naive_Ns:
            pre[f"naive_{N}"] = safe(naive_fwd, N)
        print("hca", N, {k: round(v["ms"], 4) if "ms" in v else v.get("error")
                         for k, v in pre.items() if k.endswith(f"_{N}")}, flush=True)
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
        pre[f"flex_{N}"] = safe(flex_fwd, N)
        print("hca flex", N, {k: v for k, v in pre[f"flex_{N}"].items() if k != "note"}, f"{time.time() - t0:.1f} s",
              flush=True)
        save("hca", res, out_dir)
    for N in bwd_Ns:
        res["fwd_bwd"][f"triton_{N}"] = safe(ours_fwd_bwd, N)
        print("hca fwd+bwd", N, res["fwd_bwd"][f"triton_{N}"], flush=True)
        save("hca", res, out_dir)
    save("hca", res, out_dir)
    return res


if __name__ == "__main__":
    main()
