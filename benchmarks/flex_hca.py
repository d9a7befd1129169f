"""FlexAttention baseline for HCA prefill (docs/kernels.md §9.2 T1): the same mask over concat(compressed, raw) KV.

What it computes (B, H query heads, one shared K = V head, prefill q_offset = 0, T = N queries):
    KV = concat(comp (S = N // R rows), zeros (Sp - S rows, Sp = S rounded up to 128), kv (N rows))   # (B, 1, Sp+N, D)
    query t sees compressed entry s iff s < (t + 1) // R, raw entry j iff t - W < j <= t          (= naive.py)
    flex_attention(q, KV, KV, block_mask, scale, enable_gqa=True, return_lse=True) -> o, lse
    with sink (exact): o_sink = o * exp(lse) / (exp(lse) + exp(sink_h)) = o * sigmoid(lse - sink_h)
Flex has no denominator-only sink, so the sink is a separate elementwise pass over o (sink_fix; fp32 math, compiled
to one fused kernel in the benchmark).
The zero padding makes every 128-block of KV either all compressed or all raw, so raw block r is KV block Sp/128 + r.

The BlockMask is built from block indices computed analytically per (query block, KV block) from the interval
bounds of the two visibility rules (no dense Q x KV mask evaluation, no create_block_mask compile): a block is
"full" when every (t, kv) pair in it is visible (no mask_mod call in the kernel), "partial" when some are (mask_mod
evaluated). For W = R = 128 each query block i has i // 128 full compressed blocks and at most 3 partial blocks
(compressed block i // 128, raw blocks i - 1 and i).

    python benchmarks/flex_hca.py --N 8192 --json out.json     # one shape, one compile (run in a subprocess by
                                                                # bench_hca.py so a slow compile can be cut off)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

BLOCK = 128


def _cdiv(a, b):
    return -(-a // b)


def hca_block_tables(N: int, S: int, W: int, R: int, block: int = BLOCK, device="cpu"):
    """Block-level visibility of the HCA mask over concat(comp padded to Sp, raw).

    Returns (partial, full, Sp): bool (nq, nk) tables, nq = ceil(N / block), nk = ceil((Sp + N) / block).
    Rows t of query block qb: [qb*block, min(qb*block + block - 1, N - 1)] (rows past N are Flex padding: ignored).
    KV indices of block kb: [kb*block, kb*block + block - 1] (indices past Sp + N never count as visible).
    """
    if N <= 0 or W < 0 or R <= 0:
        raise ValueError(f"hca_block_tables: N = {N}, W = {W}, R = {R}: need N > 0, W >= 0, R > 0")
    Sp = _cdiv(S, block) * block
    L = Sp + N
    nq, nk = _cdiv(N, block), _cdiv(L, block)
    qb = torch.arange(nq, device=device, dtype=torch.int64)
    t_lo = (qb * block)[:, None]
    t_hi = torch.clamp(qb * block + block - 1, max=N - 1)[:, None]
    kb = torch.arange(nk, device=device, dtype=torch.int64)
    k_lo = (kb * block)[None, :]
    k_hi = (kb * block + block - 1)[None, :]                           # unclamped: padding past L is never visible
    is_comp = k_hi < Sp                                                # a block is all compressed or all raw
    # compressed entry s visible to t iff s < (t + 1) // R (monotone in t; padded s >= S never, as (t+1)//R <= S)
    c_any = is_comp & (k_lo < torch.clamp((t_hi + 1) // R, max=S))
    c_all = is_comp & (k_hi < torch.clamp((t_lo + 1) // R, max=S))
    # raw entry j visible to t iff t - W < j <= t; the j seen by some t of the block: [t_lo - W + 1, t_hi]
    j_lo, j_hi = k_lo - Sp, k_hi - Sp
    if W > 0:
        r_any = ~is_comp & (j_lo <= t_hi) & (j_hi >= t_lo - W + 1)
        r_all = ~is_comp & (j_hi <= t_lo) & (j_lo >= t_hi - W + 1) & (j_hi < N)
    else:
        r_any = r_all = torch.zeros(nq, nk, dtype=torch.bool, device=device)
    full = c_all | r_all
    partial = (c_any | r_any) & ~full
    return partial, full, Sp


def _to_indices(tab):
    """(nq, nk) bool -> counts (1, 1, nq) int32, indices (1, 1, nq, nk) int32 (visible blocks first, ascending)."""
    nk = tab.shape[-1]
    key = torch.where(tab, torch.arange(nk, device=tab.device), nk + torch.arange(nk, device=tab.device))
    idx = torch.argsort(key, dim=-1)
    return tab.sum(-1).to(torch.int32)[None, None], idx.to(torch.int32)[None, None]


def hca_mask_mod(S: int, Sp: int, W: int, R: int):
    """Exact per-element predicate (evaluated by Flex only inside partial blocks)."""
    def mask_mod(b, h, q_idx, kv_idx):
        c_vis = kv_idx < (q_idx + 1) // R                            # kv_idx < Sp implied: (q+1)//R <= S <= Sp
        j = kv_idx - Sp
        w_vis = (kv_idx >= Sp) & (j <= q_idx) & (j > q_idx - W)
        return c_vis | w_vis
    return mask_mod


def hca_block_mask(N: int, S: int, W: int, R: int, device="cuda"):
    """BlockMask (block 128) for Flex over concat(comp padded to Sp, raw); returns (block_mask, Sp)."""
    from torch.nn.attention.flex_attention import BlockMask
    partial, full, Sp = hca_block_tables(N, S, W, R, BLOCK, device)
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                  mask_mod=hca_mask_mod(S, Sp, W, R), seq_lengths=(N, Sp + N))
    return bm, Sp


def pack_kv(kv, comp, Sp):
    """(B, Tk, D), (B, S, D) -> (B, 1, Sp + Tk, D) = concat(comp, zero padding, kv)."""
    B, S, D = comp.shape
    return torch.cat([comp, comp.new_zeros(B, Sp - S, D), kv], 1)[:, None]


def flex_lse(qf, kv_all, block_mask, scale, flex=None):
    """flex_attention(qf (B, H, T, D), K = V = kv_all) -> (o, lse); return_aux on torch >= 2.9, else return_lse."""
    import torch.nn.attention.flex_attention as fa
    flex = fa.flex_attention if flex is None else flex
    if hasattr(fa, "AuxRequest"):
        o, aux = flex(qf, kv_all, kv_all, block_mask=block_mask, scale=scale, enable_gqa=True,
                      return_aux=fa.AuxRequest(lse=True))
        return o, aux.lse
    return flex(qf, kv_all, kv_all, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)


def sink_fix(o, lse, sink):
    """o (B, H, T, D) normalised without the sink, lse (B, H, T) -> o * exp(lse) / (exp(lse) + exp(sink_h))."""
    w = torch.sigmoid(lse.float() - sink.float().view(1, -1, 1))
    return (o.float() * w[..., None]).to(o.dtype)


def flex_hca(q, kv_all, sink, scale, block_mask, flex=None, fix=sink_fix):
    """q (B, T, H, D), kv_all from pack_kv -> o (B, T, H, D); sink (H,) or None (see module doc). flex / fix:
    compiled flex_attention / sink_fix (eager when None / default)."""
    o, lse = flex_lse(q.transpose(1, 2), kv_all, block_mask, scale, flex)  # (B, H, T, D), (B, H, T) natural log
    if sink is not None:
        o = fix(o, lse, sink)
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------------------------- GPU benchmark
def bench_one(N: int, H: int = 16, D: int = 128, W: int = 128, R: int = 128) -> dict:
    """Build the block mask, compile flex_attention for this shape once (compile_s), time Flex without and with
    the sink pass. Work counted as in bench_hca.pairs (useful visible pairs only)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import bench
    from torch.nn.attention.flex_attention import flex_attention
    S = N // R
    g = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    q = torch.randn(1, N, H, D, **g)
    kv = torch.randn(1, N, D, **g)
    comp = torch.randn(1, S, D, **g)
    sink = torch.randn(H, device="cuda")
    res = {"N": N}
    t0 = time.time()
    bm, Sp = hca_block_mask(N, S, W, R, "cuda")
    torch.cuda.synchronize()
    res["block_mask_s"] = time.time() - t0
    kv_all = pack_kv(kv, comp, Sp)
    flex = torch.compile(flex_attention, dynamic=False)
    fix = torch.compile(sink_fix, dynamic=False)                      # one fused pointwise pass (read o, write o)
    scale = D ** -0.5
    t0 = time.time()
    o = flex_hca(q, kv_all, None, scale, bm, flex)
    torch.cuda.synchronize()
    res["compile_s"] = time.time() - t0
    t0 = time.time()
    o = flex_hca(q, kv_all, sink, scale, bm, flex, fix)
    torch.cuda.synchronize()
    res["sink_fix_compile_s"] = time.time() - t0
    print(f"flex N={N} compiled in {res['compile_s']:.1f} s", flush=True)
    if N <= 32768:                                                    # correctness vs the naive twin on the GPU
        from dsv4_lab.kernels.hca_attn.naive import hca_attn_naive
        n = min(N, 4096)
        ref = hca_attn_naive(q[:, :n].float(), kv.float(), comp.float(), sink, scale, W, R)
        res["max_abs_err_vs_naive_first4k"] = (o[:, :n].float() - ref).abs().max().item()
    t = pairs(N, W, R)
    f = 4 * H * D * t
    nosink = bench(lambda: flex_lse(q.transpose(1, 2), kv_all, bm, scale, flex), warmup=5, rep=100)
    withsink = bench(lambda: flex_hca(q, kv_all, sink, scale, bm, flex, fix), warmup=5, rep=100)
    for r in (nosink, withsink):
        r["tflops"] = f / (r["ms"] * 1e-3) / 1e12
    res.update(nosink=nosink, sink=withsink,
               blocks={"partial": int(bm.kv_num_blocks.sum()), "full": int(bm.full_kv_num_blocks.sum())})
    return res


def pairs(N, W, R):
    t = torch.arange(N, dtype=torch.float64)
    return float(((t + 1) // R).sum() + torch.clamp(t + 1, max=W).sum())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    try:
        out = bench_one(a.N)
    except Exception as e:                                            # noqa: BLE001
        out = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    with open(a.json, "w") as f:
        json.dump(out, f)
    print(json.dumps(out), flush=True)
