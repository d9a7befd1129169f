"""Correctness cases shared by tests/test_kernels_interpret.py (CPU, TRITON_INTERPRET=1, tiny shapes, fp32) and
tests/test_kernels_gpu.py (CUDA, real sizes, bf16 too). Each case_* function raises AssertionError on a mismatch.

Not collected by pytest (no test_ prefix): the interpreter tests must import triton only after TRITON_INTERPRET=1
is set, so they run these cases in a subprocess (`python tests/kernels_cases.py --json out.json`).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def rel(a, b):
    """||a - b|| / max(||b||, 1e-3): relative, with an absolute floor for (near-)zero references."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


def _check(name, out, ref, yard=None, tol=1e-5):
    """fp32 path: rel error < tol. bf16 path: kernel error vs the fp64 ref <= 2 x the naive bf16 twin's + tol."""
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite output"
    e = rel(out, ref)
    lim = tol if yard is None else 2 * rel(yard, ref) + tol
    assert e <= lim, f"{name}: rel err {e:.3e} > {lim:.3e}"
    return e


def _attn_grads(fn, inputs, g):
    outs = fn(*inputs)
    return outs, torch.autograd.grad(outs, [t for t in inputs if t is not None and t.requires_grad], g)


# ------------------------------------------------------------------------------------------------ sparse_attn
def case_sparse_attn(device="cpu", big=False, dtype=torch.float32):
    from dsv4_lab.attention.core import sink_attention
    from dsv4_lab.kernels.sparse_attn.naive import gather_entries, sparse_attn_naive
    from dsv4_lab.kernels.sparse_attn.triton import sparse_attn_triton
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 13, 3, 24, 6, 7, 4, True), (1, 9, 5, 20, 8, 12, 0, False)] if not big else \
        [(1, 1024, 16, 128, 256, 512, 128, True), (2, 300, 8, 128, 75, 96, 128, True)]
    for (B, T, H, D, S, K, W, has_sink) in shapes:
        q = torch.randn(B, T, H, D, generator=g)
        kv = torch.randn(B, T, D, generator=g)
        comp = torch.randn(B, S, D, generator=g)
        idx = torch.randint(0, S, (B, T, K), generator=g)
        idx[..., ::3] = -1                                              # masked picks
        idx[..., 1] = S + 3                                             # out of range
        idx[:, : T // 2, K // 2:] = -1                                  # fewer visible entries than k
        idx[..., 2] = idx[..., 4]                                       # repeated indices (counted twice)
        sink = torch.randn(H, generator=g) if has_sink else None
        if sink is not None and not big:
            sink[0] = float("-inf")                                     # a head whose sink is off
        sc = D ** -0.5
        # the naive twin equals core.sink_attention over concatenated entries (fp64)
        if not big:
            E, valid = gather_entries(kv.double(), comp.double(), idx, W)
            ref_list = [sink_attention(q[:, t:t + 1].double(), E[:, t], valid[:, t:t + 1],
                                       sink.double() if sink is not None else None, sc) for t in range(T)]
            o_ref = torch.cat(ref_list, 1)
            o_nv = sparse_attn_naive(q.double(), kv.double(), comp.double(), idx, sink.double() if sink is not None
                                     else None, sc, W)
            _check("sparse naive vs sink_attention", o_nv, o_ref, tol=1e-12)
        ts = [t.to(device) for t in (q, kv, comp)]
        leaf = [t.to(dtype).requires_grad_(True) for t in ts]
        s_leaf = sink.to(device).requires_grad_(True) if sink is not None else None
        idx_d = idx.to(device)
        go = torch.randn(B, T, H, D, generator=g).to(device)
        o_t = sparse_attn_triton(leaf[0], leaf[1], leaf[2], idx_d, s_leaf, sc, W)
        gr_t = torch.autograd.grad(o_t, leaf + ([s_leaf] if s_leaf is not None else []), go.to(dtype))
        # fp64 reference and (bf16 runs) the naive twin in the kernel's dtype as the yardstick
        ref_in = [t.double().requires_grad_(True) for t in ts]
        s_ref = sink.double().to(device).requires_grad_(True) if sink is not None else None
        o_r = sparse_attn_naive(*ref_in, idx_d, s_ref, sc, W)
        gr_r = torch.autograd.grad(o_r, ref_in + ([s_ref] if s_ref is not None else []), go.double())
        yard, gr_y = None, [None] * len(gr_r)
        if dtype != torch.float32:
            yin = [t.to(dtype).requires_grad_(True) for t in ts]
            s_y = sink.to(device).requires_grad_(True) if sink is not None else None
            yard = sparse_attn_naive(*yin, idx_d, s_y, sc, W)
            gr_y = torch.autograd.grad(yard, yin + ([s_y] if s_y is not None else []), go.to(dtype))
        tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 2e-3
        _check("sparse fwd", o_t, o_r, yard, tol)
        for nm, a, r, y in zip(["dq", "dkv", "dcomp", "dsink"], gr_t, gr_r, gr_y):
            _check(f"sparse {nm}", a, r, y, tol * 4)
    # decode: one query at position q_offset over a longer cache
    B, H, D, S, K, W, Tk = 1, 4, 32, 9, 6, 5, 40
    q = torch.randn(B, 1, H, D, generator=g).to(device)
    kv = torch.randn(B, Tk, D, generator=g).to(device)
    comp = torch.randn(B, S, D, generator=g).to(device)
    idx = torch.randint(-1, S, (B, 1, K), generator=g).to(device)
    sink = torch.randn(H, generator=g).to(device)
    o_t = sparse_attn_triton(q, kv, comp, idx, sink, 0.2, W, q_offset=Tk - 1)
    o_r = sparse_attn_naive(q.double(), kv.double(), comp.double(), idx, sink.double(), 0.2, W, q_offset=Tk - 1)
    _check("sparse decode", o_t, o_r, tol=1e-5 if device == "cpu" else 2e-3)


# ------------------------------------------------------------------------------------------------ hca_attn
def case_hca_attn(device="cpu", big=False, dtype=torch.float32):
    from dsv4_lab.attention.core import sink_attention
    from dsv4_lab.kernels.hca_attn.naive import hca_attn_naive
    from dsv4_lab.kernels.hca_attn.triton import hca_attn_triton
    g = torch.Generator().manual_seed(2)
    shapes = [(2, 37, 3, 24, 5, 4, True), (1, 21, 4, 16, 8, 8, False)] if not big else \
        [(1, 2048, 16, 128, 128, 128, True), (2, 1000, 8, 128, 128, 16, True)]
    for (B, T, H, D, W, R, has_sink) in shapes:
        S = T // R
        q = torch.randn(B, T, H, D, generator=g)
        kv = torch.randn(B, T, D, generator=g)
        comp = torch.randn(B, S, D, generator=g)
        sink = torch.randn(H, generator=g) if has_sink else None
        sc = D ** -0.5
        if not big:                                                    # naive == core.sink_attention (fp64)
            from dsv4_lab.attention.core import window_mask
            t = torch.arange(T)
            cm = torch.arange(S)[None, :] < ((t + 1) // R)[:, None]
            mask = torch.cat([window_mask(T, W), cm], -1)[None]
            o_ref = sink_attention(q.double(), torch.cat([kv, comp], 1).double(), mask,
                                   sink.double() if sink is not None else None, sc)
            o_nv = hca_attn_naive(q.double(), kv.double(), comp.double(), sink.double() if sink is not None else None,
                                  sc, W, R)
            _check("hca naive vs sink_attention", o_nv, o_ref, tol=1e-12)
        ts = [t.to(device) for t in (q, kv, comp)]
        leaf = [t.to(dtype).requires_grad_(True) for t in ts]
        s_leaf = sink.to(device).requires_grad_(True) if sink is not None else None
        go = torch.randn(B, T, H, D, generator=g).to(device)
        o_t = hca_attn_triton(leaf[0], leaf[1], leaf[2], s_leaf, sc, W, R)
        gr_t = torch.autograd.grad(o_t, leaf + ([s_leaf] if s_leaf is not None else []), go.to(dtype))
        ref_in = [t.double().requires_grad_(True) for t in ts]
        s_ref = sink.double().to(device).requires_grad_(True) if sink is not None else None
        o_r = hca_attn_naive(*ref_in, s_ref, sc, W, R)
        gr_r = torch.autograd.grad(o_r, ref_in + ([s_ref] if s_ref is not None else []), go.double())
        yard, gr_y = None, [None] * len(gr_r)
        if dtype != torch.float32:
            yin = [t.to(dtype).requires_grad_(True) for t in ts]
            s_y = sink.to(device).requires_grad_(True) if sink is not None else None
            yard = hca_attn_naive(*yin, s_y, sc, W, R)
            gr_y = torch.autograd.grad(yard, yin + ([s_y] if s_y is not None else []), go.to(dtype))
        tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 2e-3
        _check("hca fwd", o_t, o_r, yard, tol)
        for nm, a, r, y in zip(["dq", "dkv", "dcomp", "dsink"], gr_t, gr_r, gr_y):
            _check(f"hca {nm}", a, r, y, tol * 4)
    # decode at position q_offset
    B, H, D, W, R, Tk = 1, 4, 32, 6, 4, 43
    q = torch.randn(B, 1, H, D, generator=g).to(device)
    kv = torch.randn(B, Tk, D, generator=g).to(device)
    comp = torch.randn(B, Tk // R, D, generator=g).to(device)
    sink = torch.randn(H, generator=g).to(device)
    o_t = hca_attn_triton(q, kv, comp, sink, 0.2, W, R, q_offset=Tk - 1)
    o_r = hca_attn_naive(q.double(), kv.double(), comp.double(), sink.double(), 0.2, W, R, q_offset=Tk - 1)
    _check("hca decode", o_t, o_r, tol=1e-5 if device == "cpu" else 2e-3)


# ------------------------------------------------------------------------------------------------ indexer_topk
def case_indexer_topk(device="cpu", big=False, dtype=torch.float32):
    """Dyadic inputs make every score exact in any summation order, so index lists must match exactly
    (including the lower-index-first tie rule: the small integer grid produces many ties)."""
    from dsv4_lab.kernels.indexer_topk.naive import indexer_topk_naive
    from dsv4_lab.kernels.indexer_topk.triton import indexer_topk_triton
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 29, 3, 20, 7, 5, 4, 0), (1, 40, 2, 8, 40, 4, 1, 0), (1, 3, 2, 8, 12, 4, 4, 30)] if not big else \
        [(1, 2048, 4, 64, 512, 512, 4, 0), (1, 1, 4, 64, 8192, 512, 4, 32767)]
    for (B, T, HI, DI, S, k, R, off) in shapes:
        qI = (torch.randint(-3, 4, (B, T, HI, DI), generator=g).float() / 4).to(device, dtype)
        kI = (torch.randint(-3, 4, (B, S, DI), generator=g).float() / 4).to(device, dtype)
        w = (torch.randint(-2, 3, (B, T, HI), generator=g).float() / 2).to(device, dtype)
        i_t, v_t = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, return_scores=True)
        i_r, v_r = indexer_topk_naive(qI, kI, w, k, R, q_offset=off, return_scores=True)
        assert i_t.shape == i_r.shape == (B, T, k), f"shape {tuple(i_t.shape)}"
        assert torch.equal(v_t, v_r), f"indexer scores differ (max {(v_t - v_r).abs().nan_to_num().max()})"
        assert torch.equal(i_t, i_r), f"indexer indices differ at {int((i_t != i_r).sum())} slots"
        if off == 0:
            assert (i_t[:, 0] == -1).all() or R == 1, "query 0 sees no compressed entry"


# ------------------------------------------------------------------------------------------------ fake_quant
def case_fake_quant(device="cpu", big=False, dtype=torch.float32):
    from dsv4_lab.kernels.fake_quant.naive import fake_quant_naive
    from dsv4_lab.kernels.fake_quant.triton import fake_quant_triton
    from dsv4_lab.quant import fake_quant_fp8_ref, fake_quant_fp8_weight_ref, fake_quant_mxfp4_ref
    g = torch.Generator().manual_seed(4)
    shape = (2, 19, 300) if not big else (64, 1024, 1000)
    x = torch.randn(*shape, generator=g) * torch.logspace(-8, 4, shape[-1])
    x[0, 0, :5] = 0.0
    x[0, 1, 3] = -0.0
    x[0, 2, :40] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -5, 7, 6.5, 1e-9] * 3 + [0.0] * 4)
    for dt in (torch.float32, torch.bfloat16):
        xd = x.to(device, dt)
        iv = torch.int16 if dt == torch.bfloat16 else torch.int32
        cases = [("fp8", 128, False, lambda t: fake_quant_fp8_ref(t, 128)),
                 ("fp8", 64, False, lambda t: fake_quant_fp8_ref(t, 64)),
                 ("fp4", 32, False, fake_quant_mxfp4_ref),
                 ("fp8", 16 if not big else 128, True,
                  lambda t: fake_quant_fp8_weight_ref(t, 16 if not big else 128))]
        for fmt, blk, tile, ref in cases:
            r = ref(xd).view(iv)
            assert torch.equal(fake_quant_triton(xd, fmt, blk, tile).view(iv), r), f"triton {fmt}/{blk}/{tile}/{dt}"
            if not big:
                assert torch.equal(fake_quant_naive(xd, fmt, blk, tile).view(iv), r), f"naive {fmt}/{blk}/{tile}"


# ------------------------------------------------------------------------------------------------ mhc
def case_mhc(device="cpu", big=False, dtype=torch.float32):
    from dsv4_lab.kernels.mhc.naive import mhc_post_naive, mhc_pre_naive
    from dsv4_lab.kernels.mhc.triton import mhc_post_triton, mhc_pre_triton
    g = torch.Generator().manual_seed(5)
    for (B, T, n, d) in ([(2, 9, 4, 40), (1, 5, 3, 24)] if not big else [(2, 2048, 4, 384), (1, 333, 4, 1024)]):
        G = 2 + n
        x0 = torch.randn(B, T, n, d, generator=g).to(device)
        fn0 = (torch.randn(G * n, n * d, generator=g) * 0.05).to(device)
        sc0 = torch.tensor([0.5, 0.7, 0.9]).to(device)
        base0 = torch.randn(G * n, generator=g).to(device)
        y0 = torch.randn(B, T, d, generator=g).to(device)
        gu = torch.randn(B, T, d, generator=g).to(device)
        go = torch.randn(B, T, n, d, generator=g).to(device)

        def run(pre, post, dt, ft):
            ins = [x0.to(dt), fn0.to(ft), sc0.to(ft), base0.to(ft), y0.to(dt)]
            ins = [t.requires_grad_(True) for t in ins]
            u, coef = pre(*ins[:4])
            out = post(ins[4], ins[0], coef)
            loss = (u.to(ft) * gu.to(ft)).sum() + (out.to(ft) * go.to(ft)).sum()
            return [u, coef, out] + list(torch.autograd.grad(loss, ins))

        got = run(mhc_pre_triton, mhc_post_triton, dtype, torch.float32)
        ref = run(mhc_pre_naive, mhc_post_naive, torch.float64, torch.float64)
        yard = run(mhc_pre_naive, mhc_post_naive, dtype, torch.float32) if dtype != torch.float32 else \
            [None] * len(ref)
        tol = 1e-5 if device == "cpu" else 1e-4
        for nm, a, r, y in zip(["u", "coef", "post", "dx", "dfn", "dscale", "dbase", "dy"], got, ref, yard):
            _check(f"mhc {nm}", a, r, y, tol)


CASES = {"sparse_attn": case_sparse_attn, "hca_attn": case_hca_attn, "indexer_topk": case_indexer_topk,
         "fake_quant": case_fake_quant, "mhc": case_mhc}


def run_all(device="cpu", big=False, dtypes=(torch.float32,), only=None):
    res = {}
    for name, fn in CASES.items():
        if only and name not in only:
            continue
        for dt in dtypes:
            key = f"{name}[{str(dt).replace('torch.', '')}]"
            t0 = time.time()
            try:
                fn(device, big, dt)
                res[key] = {"ok": True, "seconds": round(time.time() - t0, 2)}
            except Exception:
                res[key] = {"ok": False, "seconds": round(time.time() - t0, 2), "error": traceback.format_exc()}
    return res


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(1)
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before importing triton)"
    out = run_all("cpu", False, (torch.float32,), a.only)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
