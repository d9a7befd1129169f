"""CSA (T2-T6): compressor, indexer score kernel, every indexer + top-k method, the sparse attention kernel; CSA
prefill = compressor + best indexer method + sparse attention; CSA decode (CUDA-graph replay) = best indexer method +
sparse attention. H 16, d 128, m 4, k 512, window 128, H_I 4 x d_I 64, bf16, B = 1, d_model 1024 (docs/kernels.md §8.5).

Indexer methods (dsv4_lab/kernels/indexer_topk/triton.py): radix (Triton scores per query chunk + Triton radix-select
top-k; decode: two-stage over `split`-column chunks), radix_gmax (radix with the group-max prefilter: one gather pass
instead of histogram passes over the row), torch (Triton scores + torch.topk), split_torch (Triton scores +
two-stage torch.topk), fused = the old streaming kernel (method="stream"; prefill only at 8K/32K, it is slow),
torch_topk = the naive PyTorch path (fp32 einsum scores + torch.topk; 8K/32K only). Work: indexer 2*HI*DI FLOP per
visible (query, entry) pair (docs/kernels.md §9.1); gather bandwidth counts each loaded 256-B row once per query."""
from __future__ import annotations

import time

import torch

from common import bench, bench_graph, safe, save
from dsv4_lab.kernels.indexer_topk import triton as itk
from dsv4_lab.kernels.indexer_topk.naive import indexer_topk_naive
from dsv4_lab.kernels.indexer_topk.triton import indexer_scores_triton, indexer_topk_triton
from dsv4_lab.kernels.sparse_attn.naive import sparse_attn_naive
from dsv4_lab.kernels.sparse_attn.triton import sparse_attn_fwd, sparse_attn_triton

H, D, M, K, W, HI, DI, DM = 16, 128, 4, 512, 128, 4, 64, 1024
BF = dict(device="cuda", dtype=torch.bfloat16)
PREFILL_METHODS = ("radix", "radix_gmax", "torch", "split_torch")
DECODE_METHODS = {"radix_s4096": dict(method="radix", split=4096), "radix_s8192": dict(method="radix", split=8192),
                  "radix_s16384": dict(method="radix", split=16384), "torch": dict(method="torch"),
                  "split_torch": dict(method="split_torch", split=8192), "fused": dict(method="stream")}


def indexer_inputs(N, T=None):
    T = N if T is None else T
    g = torch.Generator(device="cuda").manual_seed(N + T)
    qI = torch.randn(1, T, HI, DI, generator=g, **BF)
    kI = torch.randn(1, N // M, DI, generator=g, **BF)
    w = torch.randn(1, T, HI, generator=g, **BF) * (DI * HI) ** -0.5
    return qI, kI, w


def idx_pairs(N):
    t = torch.arange(N, dtype=torch.float64)
    return float(torch.clamp((t + 1) // M, max=K).sum()), float(torch.clamp(t + 1, max=W).sum()), \
        float(((t + 1) // M).sum())


def _tflops(r, N):
    allv = idx_pairs(N)[2]
    r.update(tflops=2 * HI * DI * allv / (r["ms"] * 1e-3) / 1e12, useful_gflop=2 * HI * DI * allv / 1e9)
    return r


def scores_only(N, chunk_elems=1 << 28):
    """The score kernel alone over all N queries, in the query chunks the top-k methods use (fill=False: as radix)."""
    qI, kI, w = indexer_inputs(N)
    S = N // M
    rows = max(1, min(N, chunk_elems // S))
    buf = torch.empty(rows * S, dtype=torch.float32, device="cuda")

    def run():
        for t0 in range(0, N, rows):
            indexer_scores_triton(qI, kI, w, M, 0, t0, min(N, t0 + rows), out=buf, fill=False)
    r = _tflops(bench(run, warmup=3, rep=50), N)
    r["note"] = f"query chunks of {rows} rows, only each chunk's visible key range, tiles past the frontier skipped"
    return r


def indexer_method(N, method):
    qI, kI, w = indexer_inputs(N)
    ws = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    split = 8192 if method == "split_torch" else None
    r = _tflops(bench(lambda: indexer_topk_triton(qI, kI, w, K, M, method=method, workspace=ws, split=split),
                      warmup=3, rep=50), N)
    r["method"] = method if split is None else f"{method} (split {split})"
    return r


def indexer_naive(N):
    qI, kI, w = indexer_inputs(N)
    r = bench(lambda: indexer_topk_naive(qI, kI, w, K, M, chunk=2048, use_topk=True), warmup=2, rep=50)
    r["note"] = "naive fp32 einsum scores in query chunks of 2048 + torch.topk (never the full [N, N/4] matrix)"
    return r


def agreement(N):
    """Correctness gate (docs/kernels.md §9.1 item 6) on random bf16 inputs: every method's top-k values vs radix
    (same score kernel -> identical fp32 scores; the streaming kernel accumulates differently -> ulp-level)."""
    qI, kI, w = indexer_inputs(N)
    i0, v0 = indexer_topk_triton(qI, kI, w, K, M, method="radix", return_scores=True)
    out = {}
    for m in ("torch", "split_torch", "stream"):
        i1, v1 = indexer_topk_triton(qI, kI, w, K, M, method=m, return_scores=True)
        fin = torch.isfinite(v0)
        out[m] = {"values_equal": bool(torch.equal(v1, v0)),
                  "max_abs_diff": float((v1 - v0)[fin].abs().max()) if fin.any() else 0.0,
                  "index_slots_equal_frac": float((i1 == i0).float().mean())}
    return out


def compressor(N):
    """Main (c = d = 128) + indexer (c = d_I = 64) overlapping compressors, forward, d_model 1024, bf16 input."""
    from dsv4_lab.attention.compressor import Compressor
    from dsv4_lab.rope import RotaryTable
    u = torch.randn(1, N, DM, **BF)
    out = {}
    for name, c in (("main", D), ("indexer", DI)):
        comp = Compressor(DM, c, M, overlap=True).to("cuda", torch.bfloat16)
        rope = RotaryTable(min(64, c), N, 10000.0).cuda()
        with torch.no_grad():
            out[f"{name}_ms"] = bench(lambda: comp(u, rope), warmup=3, rep=50)["ms"]
    out["ms"] = out["main_ms"] + out["indexer_ms"]
    out["note"] = "dsv4_lab.attention.compressor.Compressor (projections in fp32 as docs §2.3), rope dim 64"
    return out


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


def prefill_1m(t_128k_ms, budget_s=8.0):
    """One timed 1M prefill indexer run (radix), only if the 128K time x 64 (quadratic) fits the budget."""
    N = 1 << 20
    est = t_128k_ms * 64 / 1e3
    if est > budget_s:
        return {"skipped": f"estimated {est:.1f} s per run from 128K x 64 > {budget_s} s"}
    qI, kI, w = indexer_inputs(N)
    ws = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    indexer_topk_triton(qI, kI, w, K, M, method="radix", workspace=ws)
    torch.cuda.synchronize()
    t = time.perf_counter()
    indexer_topk_triton(qI, kI, w, K, M, method="radix", workspace=ws)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    return _tflops({"ms": ms, "note": "single timed run after one warm-up", "method": "radix"}, N)


def decode(N):
    S = N // M
    qI, kI, w = indexer_inputs(N, T=1)
    q = torch.randn(1, 1, H, D, **BF)
    kv = torch.randn(1, N, D, **BF)
    comp = torch.randn(1, S, D, **BF)
    sink = torch.randn(H, device="cuda")
    out = {"indexer_key_bytes": S * DI * 2}
    i_ref = indexer_topk_naive(qI, kI, w, K, M, q_offset=N - 1)
    buf = torch.empty(S, dtype=torch.float32, device="cuda")
    r = bench_graph(lambda: indexer_scores_triton(qI, kI, w, M, N - 1, out=buf, fill=False), reps=50)
    out["score_us"] = r["ms"] * 1e3
    out["score_tb_s"] = S * DI * 2 / (r["ms"] * 1e-3) / 1e12
    best = None
    for name, kw in DECODE_METHODS.items():
        def one(kw=kw):
            return indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1, **kw)
        try:
            same = torch.equal(torch.sort(one(), -1).values, torch.sort(i_ref, -1).values)   # index sets (random
            r = bench_graph(one, reps=50)                                                      # data: no ties)
            out[f"indexer_{name}_us"] = r["ms"] * 1e3
            out[f"indexer_{name}_matches_naive_set"] = same
            if best is None or r["ms"] * 1e3 < out[f"indexer_{best}_us"]:
                best = name
        except Exception as e:                                                 # noqa: BLE001
            out[f"indexer_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        torch.cuda.empty_cache()
    try:
        r = bench_graph(lambda: indexer_topk_naive(qI, kI, w, K, M, q_offset=N - 1, use_topk=True), reps=20)
        out["indexer_torch_topk_us"] = r["ms"] * 1e3                                     # naive PyTorch path
        if best is None or out["indexer_torch_topk_us"] < out[f"indexer_{best}_us"]:
            best = "torch_topk"
    except Exception as e:                                                     # noqa: BLE001
        out["indexer_torch_topk_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    idx = indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1)
    r = bench_graph(lambda: sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W, q_offset=N - 1))
    out["sparse_attn_us"] = r["ms"] * 1e3
    if best is not None:
        out["best_indexer"] = best
        out["indexer_best_us"] = out[f"indexer_{best}_us"]
        out["csa_decode_us"] = out["indexer_best_us"] + out["sparse_attn_us"]
    return out


def main(out_dir=None, Ns=(8192, 32768, 131072), bwd_Ns=(8192,), naive_Ns=(8192, 32768), stream_Ns=(8192, 32768),
         decode_Ns=(131072, 1048576), try_1m=True):
    t_start = time.time()
    res = {"shapes": {"H": H, "D": D, "m": M, "topk": K, "window": W, "HI": HI, "DI": DI, "B": 1, "d_model": DM,
                      "dtype": "bf16"},
           "indexer": {}, "compressor": {}, "sparse": {}, "fwd_bwd": {}, "decode": {}, "csa_prefill": {},
           "agreement": {}, "auto": dict(itk.AUTO)}
    for N in Ns:
        ix = res["indexer"]
        if N == Ns[0]:
            res["agreement"][f"{N}"] = safe(agreement, N)
        ix[f"scores_{N}"] = safe(scores_only, N)
        for m in PREFILL_METHODS:
            ix[f"{m}_{N}"] = safe(indexer_method, N, m)
        if N in stream_Ns:
            ix[f"fused_{N}"] = safe(indexer_method, N, "stream")
        if N in naive_Ns:
            ix[f"torch_topk_{N}"] = safe(indexer_naive, N)
        cands = {m: ix[f"{m}_{N}"]["ms"] for m in PREFILL_METHODS + ("fused", "torch_topk")   # any measured path
                 if "ms" in ix.get(f"{m}_{N}", {})}
        if cands:
            b = min(cands, key=cands.get)
            ix[f"best_{N}"] = {"method": b, "ms": cands[b]}
        res["compressor"][f"{N}"] = safe(compressor, N)
        res["sparse"][f"triton_{N}"] = safe(sparse_fwd, N)
        if N in naive_Ns[:1]:
            res["sparse"][f"naive_{N}"] = safe(sparse_naive, N)
        best, comp, sp = ix.get(f"best_{N}", {}), res["compressor"][f"{N}"], res["sparse"][f"triton_{N}"]
        if "ms" in best and "ms" in comp and "ms" in sp:
            res["csa_prefill"][f"triton_{N}"] = {"ms": comp["ms"] + best["ms"] + sp["ms"], "compressor_ms": comp["ms"],
                                                 "indexer_ms": best["ms"], "indexer_method": best["method"],
                                                 "sparse_ms": sp["ms"],
                                                 "ms_without_compressor": best["ms"] + sp["ms"]}
        else:
            res["csa_prefill"][f"triton_{N}"] = {"error": "component missing"}
        print("csa", N, {k: v for k, v in ix.items() if k.endswith(f"_{N}")}, res["compressor"][f"{N}"],
              res["sparse"][f"triton_{N}"], res["csa_prefill"][f"triton_{N}"], f"t={time.time() - t_start:.0f}s",
              flush=True)
        save("csa", res, out_dir)
        torch.cuda.empty_cache()
    for N in decode_Ns:
        res["decode"][f"{N}"] = safe(decode, N)
        print("csa decode", N, res["decode"][f"{N}"], f"t={time.time() - t_start:.0f}s", flush=True)
        save("csa", res, out_dir)
        torch.cuda.empty_cache()
    for N in bwd_Ns:
        res["fwd_bwd"][f"triton_{N}"] = safe(sparse_fwd_bwd, N)
        print("csa fwd+bwd", N, res["fwd_bwd"][f"triton_{N}"], flush=True)
        save("csa", res, out_dir)
    t128 = res["indexer"].get("radix_131072", {}).get("ms")
    if try_1m and t128:
        res["indexer"]["radix_1048576"] = safe(prefill_1m, t128)
        print("csa indexer 1M prefill", res["indexer"]["radix_1048576"], f"t={time.time() - t_start:.0f}s", flush=True)
    res["seconds"] = round(time.time() - t_start, 1)
    save("csa", res, out_dir)
    return res


def decode_only(out_dir=None, decode_Ns=(131072, 1048576), note=""):
    """Re-measure only the decode section and keep the rest of the saved csa.json (its env moves to env_rest)."""
    import json
    import os
    from common import RESULTS
    old = json.load(open(os.path.join(RESULTS, "csa.json")))
    res = {k: v for k, v in old.items() if k not in ("env", "ceilings")}
    res["env_rest"], res["ceilings_rest"] = old.get("env"), old.get("ceilings")
    res["decode"], res["decode_note"] = {}, note
    for N in decode_Ns:
        res["decode"][f"{N}"] = safe(decode, N)
        print("csa decode", N, res["decode"][f"{N}"], flush=True)
        torch.cuda.empty_cache()
    save("csa", res, out_dir)
    return res


if __name__ == "__main__":
    import sys
    if "--decode-only" in sys.argv:
        decode_only(note=" ".join(a for a in sys.argv[1:] if a != "--decode-only"))
    else:
        main()
