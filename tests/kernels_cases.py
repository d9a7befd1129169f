"""Correctness cases shared by tests/test_kernels_interpret.py (CPU, TRITON_INTERPRET=1, tiny shapes, fp32) and
tests/test_kernels_gpu.py (CUDA, real sizes, bf16 too). Each case_* function raises AssertionError on a mismatch.

Not collected by pytest (no test_ prefix): the interpreter tests must import triton only after TRITON_INTERPRET=1
is set, so they run these cases in a subprocess (`python tests/kernels_cases.py --json out.json`).
"""
from __future__ import annotations

import contextlib
import itertools
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
    """fp32 path: rel error < tol. bf16 path: kernel error vs the fp64 ref <= 2 x the naive bf16 twin's + tol.

    Error model of the fp32 tol = 1e-5 (relative Frobenius norm vs an fp64 reference): each output is a reduction
    of n <= ~200 terms (head dim + visible entries) rounded in fp32 in another order: sqrt(n) u32 = 8.4e-7 typical,
    n u32 = 1.2e-5 worst case; gradients (4 tol) chain two such reductions through the softmax backward, whose
    sum p (dO . v - delta) cancels by a factor ~2. On the GPU (2e-4 fp32) TF32-free fp32 dots of n ~ 2K terms in
    blocked order: n u32 = 1.2e-4. bf16: relative to the naive twin run in bf16 (same rounding of the inputs)."""
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
    from reference_attention import sink_attention
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
        # the naive twin equals reference_attention.sink_attention over concatenated entries (fp64)
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
    # a chunk of T queries at positions q_offset .. over a longer cache (Tk > T), gradients too: the window's
    # key-major backward (_window_bwd) must find the queries of every key from q_offset
    B, T, H, D, S, K, W, Tk = 2, 11, 3, 20, 7, 5, 9, 37
    ts = [torch.randn(B, T, H, D, generator=g), torch.randn(B, Tk, D, generator=g), torch.randn(B, S, D, generator=g)]
    idx = torch.randint(-1, S, (B, T, K), generator=g).to(device)
    sink, go = torch.randn(H, generator=g), torch.randn(B, T, H, D, generator=g)
    for q_off in (Tk - T, Tk - T - 6):                              # the chunk ends at the cache's end / before it
        leaf = [t.to(device, dtype).requires_grad_(True) for t in ts] + [sink.to(device).requires_grad_(True)]
        ref = [t.double().to(device).requires_grad_(True) for t in ts + [sink]]
        o_t = sparse_attn_triton(*leaf[:3], idx, leaf[3], 0.3, W, q_offset=q_off)
        o_r = sparse_attn_naive(*ref[:3], idx, ref[3], 0.3, W, q_offset=q_off)
        gr_t = torch.autograd.grad(o_t, leaf, go.to(device, dtype))
        gr_r = torch.autograd.grad(o_r, ref, go.double().to(device))
        yard, gr_y = None, [None] * 4
        if dtype != torch.float32:                                  # the naive twin in the kernel's dtype
            yin = [t.to(device, dtype).requires_grad_(True) for t in ts] + [sink.to(device).requires_grad_(True)]
            yard = sparse_attn_naive(*yin[:3], idx, yin[3], 0.3, W, q_offset=q_off)
            gr_y = torch.autograd.grad(yard, yin, go.to(device, dtype))
        tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 2e-3
        _check(f"sparse chunk fwd q_offset={q_off}", o_t, o_r, yard, tol)
        for nm, a, r, y in zip(["dq", "dkv", "dcomp", "dsink"], gr_t, gr_r, gr_y):
            _check(f"sparse chunk {nm} q_offset={q_off}", a, r, y, tol * 4)
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
    from reference_attention import sink_attention
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
        if not big:                                                    # naive == reference_attention.sink_attention (fp64)
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
def _check_picks(name, x, n, k, v, i):
    """Picks (v, i) (R, k) of rows x (R, L) whose first n[r] entries are visible: the k largest values as torch.topk
    finds them on the same rows (any order, any choice among ties), distinct visible indices whose entries hold the
    reported values, -1 exactly where the value is -inf (a row with fewer than k visible entries). fp64 rows are
    compared in fp64, others in fp32. All rows at once (a handful of launches: the GPU case checks 4096-row
    outputs)."""
    R, L = x.shape
    n = torch.as_tensor(n, device=x.device).long().view(R, 1)
    cols = torch.arange(L, device=x.device)
    xf = torch.where(cols < n, x.to(torch.promote_types(x.dtype, torch.float32)), float("-inf"))   # NaN garbage out
    ref = torch.topk(torch.nn.functional.pad(xf, (0, max(0, k - L)), value=float("-inf")), k, dim=1).values
    ref = torch.where(torch.arange(k, device=x.device) < n, ref, float("-inf"))   # rows with n < k (also k > L)
    got = torch.sort(v, dim=1, descending=True).values
    bad = (got != ref).any(1).nonzero()
    assert bad.numel() == 0, f"{name}: row {int(bad[0])} values differ"
    ok = i >= 0
    bad = (ok != (v != float("-inf"))).any(1).nonzero()
    assert bad.numel() == 0, f"{name}: row {int(bad[0])} -1 slots do not match -inf values"
    ii = i.long().clamp_min(0)
    assert bool(((ii < n) | ~ok).all()), f"{name}: a pick of an invisible column"
    assert bool(((xf.gather(1, ii) == v) | ~ok).all()), f"{name}: picks' values differ from reported ones"
    fill = -1 - torch.arange(k, device=x.device)                             # -1 slots made distinct
    srt = torch.sort(torch.where(ok, ii, fill), dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), f"{name}: repeated picks"


def _dyadic_indexer_inputs(g, B, T, HI, DI, S, device, dtype):
    """qI, kI in {-3..3} / 4 and w in {-2..2} / 2: every score is a small multiple of 1/32, exact in fp32 (and its
    bf16 rounding well defined) in any summation order; the coarse grid gives many equal scores."""
    qI = (torch.randint(-3, 4, (B, T, HI, DI), generator=g).float() / 4).to(device, dtype)
    kI = (torch.randint(-3, 4, (B, S, DI), generator=g).float() / 4).to(device, dtype)
    w = (torch.randint(-2, 3, (B, T, HI), generator=g).float() / 2).to(device, dtype)
    return qI, kI, w


def _check_method(name, i_t, v_t, ref, n, k):
    """One indexer_topk_triton result (i_t, and v_t if return_scores) against the exact scores ref (B, T, S) of its
    method (fp64, or fp32 where exact): _check_picks on the picks' scores looked up in ref, and the reported scores
    (sorted, descending) equal to those."""
    B, T, S = ref.shape
    assert i_t.dtype == torch.int32 and i_t.shape == (B, T, k), f"{name}: {i_t.dtype} {tuple(i_t.shape)}"
    got = torch.where(i_t < 0, float("-inf"), torch.gather(ref, 2, i_t.long().clamp(0, S - 1)))  # i >= S: caught below
    _check_picks(name, ref.reshape(B * T, S), n, k, got.reshape(B * T, k), i_t.reshape(B * T, k))
    if v_t is not None:
        assert v_t.dtype == torch.float32 and torch.equal(v_t.to(ref.dtype), got), f"{name}: reported scores differ"
        assert bool((v_t[..., 1:] <= v_t[..., :-1]).all()), f"{name}: returned scores not sorted"


def _check_select_naive(name, out, return_scores, ref, k):
    """A select method's result on scores equal to ref (B, T, S) is the naive twin's (topk_indices: stable sort, lower
    index first among ties): the same (idx, val) slot by slot with return_scores (select's picks are sorted stably),
    the same index set without."""
    from dsv4_lab.kernels.indexer_topk.naive import topk_indices
    i_n, v_n = topk_indices(ref, k, return_scores=True)
    if return_scores:
        assert torch.equal(out[0], i_n) and torch.equal(out[1], v_n), f"{name}: differs from the naive twin's top-k"
    else:
        assert torch.equal(torch.sort(out, -1).values, torch.sort(i_n, -1).values), \
            f"{name}: index set differs from the naive twin's"


def case_indexer_topk(device="cpu", big=False, dtype=torch.float32):
    """indexer_topk_triton with method="auto" (the model's path: AUTO["prefill"] for T > DECODE_T queries,
    AUTO["decode"] for fewer) and every method by name, against torch.topk of the fp64 scores. Dyadic inputs make
    every score exact in fp32 and fp64 in any summation order, so no pick can flip: the picks' scores must be the k
    largest as a multiset (which of several entries tied at the k-th value is taken is free for torch.topk: the
    coarse grid makes many such ties), rows with fewer visible entries than k must hold all of them and -1 in every
    other slot; the select methods must return exactly the naive twin's picks (_check_select_naive). The score kernel
    alone, under each launch config and with and without the -inf fill of unseen key tiles: the exact scores."""
    from dsv4_lab.kernels.indexer_topk import indexer_topk
    from dsv4_lab.kernels.indexer_topk.naive import indexer_scores
    from dsv4_lab.kernels.indexer_topk.triton import (AUTO, BF16_TWIN, DECODE_T, FP32_TWIN, METHODS,
                                                      indexer_topk_triton)
    import triton

    from dsv4_lab.kernels.indexer_topk.triton import SCORE_CANDIDATE_CONFIGS, _indexer_scores_fwd, indexer_scores_triton
    # every config of the score kernel's list and candidates on the GPU; on CPU one key tile per program and three
    # (NLOOP: the straight-line and the looped kernel), in 16-key tiles so that small shapes span several tiles
    score_cfgs = list(_indexer_scores_fwd.configs) + SCORE_CANDIDATE_CONFIGS if device != "cpu" else \
        [triton.Config({"BLOCK_N": 16, "NLOOP": 1}, num_warps=4, num_stages=1),
         triton.Config({"BLOCK_N": 16, "NLOOP": 3}, num_warps=4, num_stages=1)]
    g = torch.Generator().manual_seed(3)
    # (B, T, HI, DI, S, k, ratio, q_offset): prefill (T > DECODE_T), its early rows shorter than k; decode with k
    # below / above / equal to the visible count (5 entries, k 12; 8 entries, k 8); one head of DI 2: few distinct
    # scores, so 6-77 entries tie at the k-th value (one row at -0.0 = +0.0: w < 0), in an odd 4100-entry decode row
    # too (the select splits it over 3 programs)
    shapes = [(2, 29, 3, 20, 7, 5, 4, 0), (1, 40, 2, 8, 40, 4, 1, 0),
              (1, 3, 2, 8, 12, 4, 4, 30), (2, 1, 3, 16, 9, 12, 4, 20), (1, 2, 2, 8, 10, 8, 4, 31),
              (2, 1, 1, 2, 100, 7, 1, 99), (1, 1, 1, 2, 4100, 9, 1, 4099)] if not big else \
        [(1, 2048, 4, 64, 512, 512, 4, 0), (1, 1, 4, 64, 8192, 512, 4, 32767), (2, 3, 4, 64, 20000, 512, 4, 79999),
         (1, 1, 4, 64, 1000, 512, 4, 2000)]
    for (B, T, HI, DI, S, k, R, off) in shapes:
        qI, kI, w = _dyadic_indexer_inputs(g, B, T, HI, DI, S, device, dtype)
        ref = indexer_scores(qI.double(), kI.double(), w.double(), R, off)         # (B, T, S) fp64, -inf invisible
        n = torch.clamp((off + torch.arange(T) + 1) // R, max=S).repeat(B)
        auto = AUTO["decode" if T <= DECODE_T else "prefill"]
        auto16 = BF16_TWIN.get(auto, auto)                              # auto_bf16: index_score_dtype="bf16"
        auto = FP32_TWIN.get(auto, auto) if dtype == torch.float32 else auto
        for m in ("auto", "auto_bf16") + METHODS:
            name = {"auto": f"auto={auto}", "auto_bf16": f"auto_bf16={auto16}"}.get(m, m)
            r = ref.bfloat16().double() if name.endswith("_bf16") else ref   # bf16 methods: the sums rounded once
            for rs in (True, False) if m.startswith("auto") else (True,):   # unsorted: also case_indexer_methods
                out = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, return_scores=rs, method=m)
                _check_method(f"{name} {(B, T, S, k, R, off)} return_scores={rs}", *(out if rs else (out, None)),
                              r, n, k)
                if name.startswith(("select", "sieve")):
                    _check_select_naive(f"{name} {(B, T, S, k, R, off)} return_scores={rs}", out, rs, r, k)
        for cfg in score_cfgs:                  # the score kernel under each launch config: the exact scores
            for fill in (True, False):
                sc = indexer_scores_triton(qI, kI, w, R, off, config=cfg, fill=fill).double()     # (B, T, S')
                want = ref[..., :sc.shape[-1]]
                vis = torch.isfinite(want)
                assert torch.equal(sc[vis], want[vis]), f"scores {(B, T, S, R, off)} {cfg} fill={fill}"
                assert not fill or bool((sc[~vis] == float("-inf")).all()), f"-inf fill {(B, T, S, R, off)} {cfg}"
        for sdt, m in (("fp32", "auto"), ("bf16", "auto_bf16")):      # the model's dispatcher routes score_dtype
            a = indexer_topk(qI, kI, w, k, R, q_offset=off, impl="triton", return_scores=True, score_dtype=sdt)
            b = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, return_scores=True, method=m)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"indexer_topk score_dtype={sdt} is not {m}"


def _mxfp4_bound(qI, keys, w, R, off):
    """(fp64 scores of the unpacked keys, the error bound E of an fp32 score): products of bf16 or fp32 operands
    summed in fp32 in any order, then the HI heads' weighted sum: off the exact value by at most (DI + HI) u
    sum_h |w_h| sum_d |q k|, with u = 2^-23 (one ulp per addition: tensor cores may truncate, not round)."""
    from dsv4_lab.kernels.indexer_topk.naive import indexer_scores, mxfp4_key_values
    k64, q64, w64 = mxfp4_key_values(keys).double(), qI.double(), w.double()
    u = 2.0 ** -23
    err = (qI.shape[-1] + qI.shape[-2]) * u * torch.einsum("bth,bthd,bsd->bts", w64.abs(), q64.abs(), k64.abs())
    return indexer_scores(q64, k64, w64, R, off), err


def _mxfp4_agree(tag, qI, keys, vq, w, k, R, off, configs):
    """Score kernel on packed keys vs on the same keys unpacked. The products are equal, but the packed kernel sums
    them per 32-element block, and on the GPU tensor-core MMAs issued differently may round differently even under
    one config: so an error model, not bits. Each score is off the
    exact one by at most E (_mxfp4_bound), so the two differ by at most 2 E (+ one bf16 ulp of the score for bf16
    scores); under each config of `configs` and tuned. The tuned top-k picks may differ only among entries whose
    exact (fp64) score lies within that of the row's k-th (for one query also with the packed scores' launch
    counting the select's first digit, fuse_level0)."""
    from dsv4_lab.kernels.indexer_topk.triton import indexer_scores_triton, indexer_topk_triton
    ref, err = _mxfp4_bound(qI, keys, w, R, off)
    S = ref.shape[-1]
    for cfg in (None, *configs):
        for sdt, ulp in ((torch.float32, 0.0), (torch.bfloat16, 2.0 ** -7)):
            a = indexer_scores_triton(qI, keys, w, R, off, dtype=sdt, config=cfg).double()
            b = indexer_scores_triton(qI, vq, w, R, off, dtype=sdt, config=cfg).double()
            Sp = a.shape[-1]
            fin = torch.isfinite(ref[..., :Sp])
            assert torch.equal(torch.isfinite(a), fin) and torch.equal(torch.isfinite(b), fin), f"{tag}: visibility"
            bound = 2 * err[..., :Sp] + ulp * torch.maximum(a.abs(), b.abs())
            d = torch.where(fin, (a - b).abs() - bound, 0.0)
            assert bool((d <= 0).all()), \
                f"{tag} {cfg}: {sdt} scores differ by {float(d.max()):.3g} beyond the error model"
    runs = [(m, ulp, fuse) for m, ulp in (("auto", 0.0), ("auto_bf16", 2.0 ** -7))
            for fuse in ((False, True) if qI.shape[1] == 1 else (False,))]      # one query: also the fused digit 0
    for m, ulp, fuse in runs:
        ia = indexer_topk_triton(qI, keys, w, k, R, q_offset=off, method=m, fuse_level0=fuse)
        ib = indexer_topk_triton(qI, vq, w, k, R, q_offset=off, method=m)
        for row in range(ia.shape[0] * ia.shape[1]):
            sa, sb = (set(x.reshape(-1, x.shape[-1])[row].tolist()) - {-1} for x in (ia, ib))
            if sa == sb:
                continue
            r = ref.reshape(-1, S)[row]
            kth = torch.topk(r, min(k, S)).values[-1]
            tol = 2 * err.reshape(-1, S)[row].max() + 2 * ulp * kth.abs()
            assert all((r[i] - kth).abs() <= tol for i in sa ^ sb), \
                f"{tag}: method {m} picks differ beyond near-ties of the k-th score"


def case_indexer_mxfp4(device="cpu", big=False, dtype=torch.float32):
    """Indexer keys packed as MXFP4 (naive.MXFP4Keys, as the paper caches them) against the same keys unpacked: the
    twin's unpacking is dsv4_lab.quant's mxfp4_dequantize bit for bit, and every unpacked value is exact in bf16. The
    score kernel on packed keys (which sums per 32-element block) against the unpacked keys, within _mxfp4_agree's
    error model, under every config of the autotune list and tuned, and the top-k picks up to near-ties (fp32 and
    bf16 scores, decode and prefill tiles, partial key tiles, DI 32 / 64 / 96 / 128, a block of zeros, -0.0 codes,
    large and tiny scales); the naive twin on packed keys bit for bit as on the unpacked ones. Malformed packed keys
    get a one-line ValueError."""
    from dsv4_lab.kernels.indexer_topk import MXFP4Keys, indexer_topk, mxfp4_key_values
    from dsv4_lab.kernels.indexer_topk import triton as it
    from dsv4_lab.kernels.indexer_topk.triton import indexer_scores_triton
    from dsv4_lab.quant.mxfp4 import mxfp4_dequantize, mxfp4_quantize
    g = torch.Generator().manual_seed(17)
    # (B, T, HI, DI, S, k, ratio, q_offset): prefill chunks (T > 16) and decode rows (T = 1, 2), S not a multiple of
    # any key tile
    shapes = [(2, 21, 3, 64, 45, 6, 4, 60), (1, 1, 2, 32, 77, 9, 1, 76), (1, 2, 4, 128, 19, 5, 4, 80),
              (1, 3, 2, 96, 40, 7, 4, 150)] if not big \
        else [(1, 1, 4, 64, 262144, 512, 4, 1048575), (1, 2048, 4, 64, 512, 512, 4, 0)]
    for (B, T, HI, DI, S, k, R, off) in shapes:
        x = torch.randn(B, S, DI, generator=g) * torch.exp2(torch.randint(-20, 20, (B, S, 1), generator=g).float())
        x[0, 0, :32] = 0.0                                              # a block of zeros (the amax floor)
        x[-1, -1, 1] = -0.0
        codes, scales = mxfp4_quantize(x)
        keys = MXFP4Keys(codes.to(device), scales.to(device))
        vals = mxfp4_key_values(keys)
        assert torch.equal(vals.cpu().view(torch.int32), mxfp4_dequantize(codes, scales).view(torch.int32)), \
            "mxfp4_key_values differs from dsv4_lab.quant.mxfp4_dequantize"
        for qdt in ((dtype, torch.bfloat16) if device == "cpu" and dtype != torch.bfloat16 else (dtype,)):
            qI = torch.randn(B, T, HI, DI, generator=g).to(device, qdt)
            w = torch.randn(B, T, HI, generator=g).to(device, qdt)
            tag = f"MXFP4 keys {qdt} {(B, T, HI, DI, S, k, R, off)}"
            vq = vals.to(qdt)
            _mxfp4_agree(tag, qI, keys, vq, w, k, R, off, it._indexer_scores_fwd.configs if device != "cpu" else ())
            if not big:                                                # the naive twin takes packed keys too
                a = indexer_topk(qI, keys, w, k, R, q_offset=off, impl="torch", return_scores=True)
                b = indexer_topk(qI, vals.to(qdt), w, k, R, q_offset=off, impl="torch", return_scores=True)
                assert all(torch.equal(u, v) for u, v in zip(a, b)), f"{tag}: the naive twin's picks differ"
    qI = torch.zeros(1, 1, 1, 32, device=device)
    w = torch.zeros(1, 1, 1, device=device)
    for bad, what in ((MXFP4Keys(torch.zeros(1, 4, 16, device=device), torch.zeros(1, 4, 1, dtype=torch.uint8,
                                                                                      device=device)), "dtype"),
                      (MXFP4Keys(torch.zeros(1, 4, 24, dtype=torch.uint8, device=device),
                                 torch.zeros(1, 4, 1, dtype=torch.uint8, device=device)), "are not allowed")):
        try:
            indexer_scores_triton(qI, bad, w, 1, 3)
        except ValueError as e:
            assert "MXFP4Keys" in str(e) and what in str(e) and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"malformed MXFP4Keys ({what}) accepted")


# ------------------------------------------------------------------------------------------------ indexer_methods
def case_indexer_methods(device="cpu", big=False, dtype=torch.float32):
    """The Triton score kernel (fp32 and bf16 scores) and every top-k method of indexer_topk/triton.py vs the naive
    twin, in query chunks (chunk_elems), with a score workspace whose unwritten slots hold NaN / inf (a method must
    read only what the score kernel wrote). Dyadic inputs keep every score exact in any order and dtype, so scores
    must match exactly; the fp32-score methods must return the naive twin's top-k values, the bf16 ones the top-k of
    the scores rounded once to bf16, as sets of distinct visible picks, -1 exactly at -inf (_check_method); the
    select methods exactly the naive twin's picks on those scores (_check_select_naive). One-query calls (decode) of
    the select methods also run with the select's first digit counted by the score launch (fuse_level0): the same
    picks and values bit for bit, and the select workspace left zeroed. `select` also runs with its fp32 rows through
    the other of the tail select and the radix select (triton.FP32_TAIL toggled), unfused and, at one query, fused:
    the same picks and values bit for bit."""
    from dsv4_lab.kernels.indexer_topk.naive import indexer_scores, indexer_topk_naive
    from dsv4_lab.kernels.indexer_topk.triton import METHODS, indexer_scores_triton, indexer_topk_triton
    g = torch.Generator().manual_seed(7)
    # (B, T, HI, DI, S, k, ratio, q_offset, chunk_elems): one chunk; query chunks of 16 rows with skipped tiles;
    # decode in one chunk; decode in 3 query chunks (chunk_elems below T x S'); one-query decode of 3 rows (the
    # fused first digit over 2 programs), of a row with fewer than k visible entries, and of one with k + 1
    if not big:
        shapes = [(2, 7, 3, 20, 5, 5, 4, 0, 1 << 28), (1, 24, 4, 16, 40, 6, 1, 8, 400),
                  (2, 1, 3, 16, 100, 5, 4, 398, 1 << 28), (1, 5, 2, 8, 60, 7, 1, 40, 100),
                  (3, 1, 2, 8, 30, 9, 1, 20, 1 << 28), (1, 1, 2, 8, 30, 9, 4, 20, 1 << 28),
                  (1, 1, 2, 8, 30, 9, 1, 9, 1 << 28)]
    else:
        shapes = [(1, 4096, 4, 64, 1024, 512, 4, 0, 1 << 28), (2, 3000, 4, 64, 750, 512, 4, 0, 1 << 20),
                  (1, 2048, 4, 64, 32768, 512, 4, 120000, 1 << 26), (1, 1, 4, 64, 65536, 512, 4, 262143, 1 << 28),
                  (2, 3, 4, 64, 20000, 512, 4, 79999, 1 << 28), (3, 1, 4, 64, 50000, 512, 4, 199999, 1 << 28)]
    for (B, T, HI, DI, S, k, R, off, ce) in shapes:
        qI, kI, w = _dyadic_indexer_inputs(g, B, T, HI, DI, S, device, dtype)
        t0 = T // 3
        ref = indexer_scores(qI, kI, w, R, off, t0, T)
        Sp = max(0, min(S, (off + T) // R))
        for sdt in (torch.float32, torch.bfloat16):
            sc = indexer_scores_triton(qI, kI, w, R, off, t0, T, dtype=sdt)
            assert sc.shape == (B, T - t0, Sp), f"score shape {tuple(sc.shape)} vs {(B, T - t0, Sp)}"
            assert sc.dtype == sdt and torch.equal(sc.float(), ref[..., :Sp].to(sdt).float()), \
                f"{sdt} score kernel differs from indexer_scores"
        assert (ref[..., Sp:] == float("-inf")).all(), "entries beyond S' must be invisible to the whole chunk"
        full = indexer_scores(qI, kI, w, R, off)                                     # (B, T, S) exact fp32 sums
        n = torch.clamp((off + torch.arange(T) + 1) // R, max=S).repeat(B)
        _, v_r = indexer_topk_naive(qI, kI, w, k, R, q_offset=off, return_scores=True)
        for m in METHODS:
            r = full.bfloat16().float() if m.endswith("_bf16") else full
            for rs in (True, False):
                ws = torch.full((B * T * -(-S // 64) * 64 + 64,), float("nan"), device=device)   # unwritten: NaN
                ws[1::2] = float("inf")
                out = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, return_scores=rs, method=m,
                                          chunk_elems=ce, workspace=ws)
                _check_method(f"{m} {(B, T, S, k, R, off, ce)} return_scores={rs}", *(out if rs else (out, None)),
                              r, n, k)
                if rs and not m.endswith("_bf16"):
                    assert torch.equal(out[1], v_r), f"{m}: top-k values differ from the naive twin's"
                if m.startswith(("select", "rowsel", "sieve")):
                    _check_select_naive(f"{m} {(B, T, S, k, R, off, ce)} return_scores={rs}", out, rs, r, k)
                if m.startswith("select") and T == 1:                 # the score launch counting digit 0
                    from dsv4_lab.kernels.indexer_topk.triton import _select_workspace
                    fused = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, return_scores=rs, method=m,
                                                chunk_elems=ce, workspace=ws, fuse_level0=True)
                    same = all(map(torch.equal, fused, out)) if rs else torch.equal(fused, out)
                    assert same, f"{m} {(B, T, S, k, R, off)} return_scores={rs}: fuse_level0 changes the picks"
                    assert not _select_workspace(B, qI.device).hist.any(), f"{m} fused: workspace left non-zero"
                if m == "select" and rs:      # fp32 rows through the other path (tail / radix), unfused and fused
                    from dsv4_lab.kernels.indexer_topk import triton as itk
                    old, itk.FP32_TAIL = itk.FP32_TAIL, not itk.FP32_TAIL
                    try:
                        for fu in ((False, True) if T == 1 else (False,)):
                            other = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, return_scores=True, method=m,
                                                        chunk_elems=ce, workspace=ws, fuse_level0=fu)
                            assert all(map(torch.equal, other, out)), \
                                f"select {(B, T, S, k, R, off)} fuse_level0={fu}: FP32_TAIL changes the picks"
                    finally:
                        itk.FP32_TAIL = old
                    assert not itk._select_workspace(B, qI.device).hist.any(), f"{m} tail: workspace left non-zero"
    # rows longer than the row select holds go to the split-row select: the same picks, slot for slot
    from dsv4_lab.kernels.indexer_topk import rowselect
    B, T, HI, DI, S, k, R, off, ce = shapes[1]
    qI, kI, w = _dyadic_indexer_inputs(g, B, T, HI, DI, S, device, dtype)
    keep, rowselect.MAX_L = rowselect.MAX_L, 8
    try:
        got = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, method="rowsel", chunk_elems=ce)
    finally:
        rowselect.MAX_L = keep
    assert torch.equal(got, indexer_topk_triton(qI, kI, w, k, R, q_offset=off, method="select", chunk_elems=ce)), \
        "rowsel on rows longer than rowselect.MAX_L must give select's picks"
    # auto in prefill with AUTO_SHORT_L: the query chunks that see at most AUTO_SHORT_L entries take rowsel, the
    # others AUTO["prefill"]; a cut inside the range mixes both in one call (and with AUTO_SHORT_L above every chunk
    # the single-chunk call writes its picks directly). Checked like every method, and against select's picks on the
    # short chunks' rows
    from dsv4_lab.kernels.indexer_topk import triton as itt
    full = indexer_scores(qI, kI, w, R, off)
    n = torch.clamp((off + torch.arange(T) + 1) // R, max=S).repeat(B)
    sel = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, method="select", chunk_elems=ce)
    keep = itt.AUTO_SHORT_L
    first = itt._visible(R, off, itt._row_budget(itt._visible(R, off, T, S), T, ce // B), S)   # the first chunk's
    for cut, chunks in ((first, ce), (S, ce), (S, 1 << 28)):
        itt.AUTO_SHORT_L = cut
        try:
            for rs in (True, False):
                out = indexer_topk_triton(qI, kI, w, k, R, q_offset=off, return_scores=rs, method="auto",
                                          chunk_elems=chunks)
                _check_method(f"auto AUTO_SHORT_L={cut} chunk_elems={chunks} return_scores={rs}",
                              *(out if rs else (out, None)), full, n, k)
        finally:
            itt.AUTO_SHORT_L = keep
        rows = itt._row_budget(itt._visible(R, off, T, S), T, chunks // B) if cut < S else T
        assert itt._visible(R, off, rows, S) <= cut < itt._visible(R, off, T, S) or cut == S, "the cut must split"
        assert torch.equal(out[:, :rows], sel[:, :rows]), \
            f"auto AUTO_SHORT_L={cut}: the short chunks must give select's (= rowsel's) picks, slot for slot"


# ------------------------------------------------------------------------------------------------ indexer_select
def select_expected(x, n, k):
    """What radix_select must return for rows x (R, L) whose first n[r] entries are visible (indexer_topk/select.py
    docstring): (vals fp32, idx int32) (R, k). Rows with n > k: t = the k-th largest visible value, r = k - #(> t);
    slots [0, k - r) = the entries > t in index order, slots [k - r, k) = the r lowest-index entries == t in index
    order (-0.0 == +0.0, as in torch). Rows with n <= k: slot = column, slots >= n empty. Picks of -inf and empty
    slots: -1 / -inf. Values are the entries themselves (compare bitwise: -0.0 stays -0.0). Vectorised (GPU rows)."""
    R, L = x.shape
    n = torch.as_tensor(n, device=x.device).long().view(R, 1)
    cols = torch.arange(L, device=x.device)
    vis = cols < n
    xf = torch.where(vis, x.float(), float("-inf"))                           # NaN garbage out
    t = torch.topk(xf, k, dim=1).values[:, -1:]                              # (R, 1) k-th largest
    gt = vis & (xf > t)
    eq = vis & (xf == t)
    take = gt | (eq & (torch.cumsum(eq.int(), 1) <= k - gt.sum(1, keepdim=True)))   # lowest-index ties
    small = n <= k
    gt, take = torch.where(small, vis, gt), torch.where(small, vis, take)
    key = torch.where(take, torch.where(gt, cols, cols + L), 3 * L)          # > t first, then ties, each by index
    order = torch.sort(key, dim=1, stable=True).indices[:, :k]
    ok = take.gather(1, order)
    v = torch.where(ok, xf.gather(1, order), float("-inf"))
    return v, torch.where(ok & (v != float("-inf")), order, -1).to(torch.int32)


def _check_select_exact(name, x, n, k, v, i):
    """radix_select's (v, i) equal select_expected slot by slot (indices, and values bitwise), and the index set
    equals the naive twin's top-k (topk_indices: stable sort, lower index first) of the same visible entries."""
    ev, ei = select_expected(x, n, k)
    bad = (i != ei).any(1).nonzero()
    assert bad.numel() == 0, f"{name}: row {int(bad[0]) if bad.numel() else 0} indices differ from the expected order"
    assert torch.equal(v.view(torch.int32), ev.view(torch.int32)), f"{name}: values differ (bitwise) from expected"
    R, L = x.shape
    nn = torch.as_tensor(n, device=x.device).long().view(R, 1)
    xf = torch.where(torch.arange(L, device=x.device) < nn, x.float(), float("-inf"))
    _check_select_naive(name, i[None], False, xf[None], k)                  # the rows as one batch of R queries


@contextlib.contextmanager
def _programs_reversed():
    """Under TRITON_INTERPRET=1: every launch inside runs its programs in reverse order on grid axes 0 and 1 (the
    interpreter runs them in order; a GPU may run them in any order). Patches the interpreter's set_grid_idx (a
    bijection of the grid: every program still runs once)."""
    from triton.runtime import interpreter as ti
    b = ti.interpreter_builder
    orig = b.set_grid_idx
    b.set_grid_idx = lambda x, y, z: orig(b.grid_dim[0] - 1 - x, b.grid_dim[1] - 1 - y, z)
    try:
        yield
    finally:
        del b.set_grid_idx                                                    # back to the class's method


def case_indexer_select(device="cpu", big=False, dtype=torch.float32):
    """Split-row radix select (indexer_topk/select.py) and the row select (rowselect.py: the same output contract,
    one program per row) on raw rows (no score kernel: the GPU case compiles only the selects' kernels): fp32 and
    bf16 rows, both digit widths, one and several programs per row, odd lengths, rows
    with fewer visible entries than k, as many and more than k (causal frontier; NaN garbage after it, never read).
    Rows: randn (few ties); small integers (many entries tied at the k-th value, spanning several programs: integer
    values are exact in bf16, no rounding can split a tie; row 0 every third entry -inf); {-inf, -1, -0.0, +0.0}
    (the k-th value 0 with -0.0 / +0.0 ties; the last row has fewer finite entries than k, so -inf ties at the k-th
    value, reported -1). Checks: the values as torch.topk finds them (_check_picks), the exact slot order and the
    naive twin's index set (_check_select_exact); repeats are bitwise equal to the first run: on CPU one repeat with
    every launch's programs in reverse order (_programs_reversed: a slot order or tie choice that follows the order
    programs run fails it), on the GPU two repeats (the hardware schedules the programs), the second, and the second
    run of each select below, with the scattered stores as inline PTX (`asm_stores`, select.py _scatter: the
    interpreter cannot run PTX, so on CPU every run stores with tl.store), and radix_select and the tail select a
    third time with programmatic dependent launch as well (`pdl`: each launch starts before the one before it
    ends); all calls share one SelectWorkspace, which every call must leave zeroed (its last program per row clears
    it). The one-launch select (`one_launch=True`: a grid barrier per digit level; under the interpreter the same
    levels as separate launches, with its program count): bitwise equal to the multi-launch result, the workspace
    left zeroed. The tail select
    (tailselect.py, fp32 rows; on CPU with its programs reversed, so another program is the row's last): the same
    bits, on a row built for its tail with each of its paths (a bucket ranked in one compare in a tile of at most 64
    entries, bisected in a larger tile, or streamed over the row). The row select, on
    every row set of at most rowselect.MAX_L entries: bitwise equal to radix_select's result (and so to the expected
    slot order), on the GPU twice. Row dtypes: under the interpreter one call covers fp32 and bf16 rows; on the GPU
    the fp32 and bf16 tests split them (each the rows of its own dtype; the fp32 test also every check after the
    shapes), so the two GPU tests are not one case run twice."""
    from dsv4_lab.kernels.indexer_topk.rowselect import MAX_L, row_select
    from dsv4_lab.kernels.indexer_topk.select import SelectWorkspace, radix_select
    from dsv4_lab.kernels.indexer_topk.sieve import sieve_select
    from dsv4_lab.kernels.indexer_topk.tailselect import tail_select
    g = torch.Generator().manual_seed(11)
    row_dtypes = (torch.float32, torch.bfloat16) if not big else (dtype,)
    sieve_paths = set()
    ws = SelectWorkspace(2, programs=2, device=device)     # shared by every call (grown by radix_select when short)
    # (R, L, k, programs, frontier). Decode-like rows (L > 1000; on CPU in 256-entry blocks, the interpreter's cost
    # is per block): 4100 entries over 3 programs (the default) and 5 (the last one holds 4 entries), k = 64 and 512,
    # a frontier inside the last chunk (n = 4000, 4001), and n = 511 / 512 / 513 around k = 512 (frontier (3, 510, 1):
    # rows shorter than, as long as and longer than k; ties over 2 programs)
    shapes = [(2, 203, 7, None, None), (2, 257, 20, 3, None), (4, 97, 9, 2, (4, 5, 4)), (1, 5, 5, 1, None),
              (2, 4100, 64, None, None), (2, 4100, 512, 5, (2, 3999, 1)), (3, 1100, 512, 3, (3, 510, 1))] \
        if not big else [(2, 262144, 512, None, None), (8, 32771, 512, None, None), (64, 4099, 512, 1, (64, 2000, 4)),
                         (3, 65536, 512, None, (3, 510, 1)), (2, 65536, 64, 7, (2, 60000, 1)),
                         (48, 32768, 512, 1, (48, 131023, 4))]      # prefill rows at 128K: the row select's longest
    for (R, L, k, P, fr) in shapes:
        blk = 256 if device == "cpu" and L > 1000 else None
        n = torch.full((R,), L) if fr is None else \
            torch.clamp((fr[1] + torch.arange(R) % fr[0] + 1) // fr[2], max=L)
        zeros = torch.tensor([float("-inf"), -1.0, -0.0, 0.0])[torch.randint(0, 4, (R, L), generator=g)]
        zeros[-1, (k + 1) // 2:] = float("-inf")                               # fewer finite entries than k
        rows = {"randn": torch.randn(R, L, generator=g) * 3,
                "ties": torch.randint(0, 8 if L > 1000 else 5, (R, L), generator=g).float(),
                "zeros": zeros,
                **({"binade": 1 + torch.rand(R, L, generator=g)} if big else {})}
        rows["ties"][0, ::3] = float("-inf")
        for j, (nm, x) in enumerate(rows.items()):
            for dt, db in ((torch.float32, (4, 8)[j % 2]), (torch.bfloat16, (8, 4)[j % 2])):   # both digit widths
                if dt not in row_dtypes:
                    continue
                xd = x.to(device, dt)
                for r in range(R):
                    xd[r, int(n[r]):] = float("nan")                          # beyond the frontier: never read
                if nm == "randn" and device == "cpu" and L > 1000:
                    continue                                      # few ties: the short rows cover them on CPU
                tag = f"radix_select {nm} {dt} digits {db} {(R, L, k, P, fr)}"
                def run(asm=False, pdl=False):  # one workspace for all shapes: each call must leave it zeroed
                    res = radix_select(xd, k, frontier=fr, programs=P, digit_bits=db, block=blk, workspace=ws,
                                       asm_stores=asm, pdl=pdl)
                    assert not ws.hist.any(), f"{tag}: the histograms / tickets were not left zeroed"
                    return res
                v, i = run()
                _check_picks(tag, xd, n, k, v, i)
                _check_select_exact(tag, xd, n, k, v, i)
                if device == "cpu":                      # the interpreter runs programs in order: reverse it
                    with _programs_reversed():
                        again = [run()]
                else:                                    # the GPU schedules programs as it likes
                    again = [run(), run(asm=True), run(asm=True, pdl=True)]
                for a, (v2, i2) in enumerate(again):
                    assert torch.equal(i2, i) and torch.equal(v2.view(torch.int32), v.view(torch.int32)), \
                        f"{tag}: repeat {a + 1} differs bitwise from the first run"
                for a in range(1 if device == "cpu" else 2):     # the one-launch select (grid barriers): the same
                    v2, i2 = radix_select(xd, k, frontier=fr, programs=P, digit_bits=db, block=blk, workspace=ws,
                                          one_launch=True, asm_stores=a == 1)
                    assert not ws.hist.any(), f"{tag}: one_launch left the histograms / counter nonzero"
                    assert torch.equal(i2, i) and torch.equal(v2.view(torch.int32), v.view(torch.int32)), \
                        f"{tag}: radix_select one_launch (run {a + 1}) differs bitwise from the multi-launch select"
                # the tail select (fp32 rows: two digits, then the exact tail; tailselect.py), over the shape's
                # programs, in reverse program order on CPU (another program is the row's last): the same bits
                # (asm_stores, pdl, one_launch, programs reversed on CPU); one_launch on CPU: the emit with every
                # program's ticket (the one launch's rule), in program order (the row's last program may be one
                # past the row's entries) and reversed
                runs = [(False, False, False, True), (False, False, True, True), (False, False, True, False)] \
                    if device == "cpu" else [(False, False, False, False), (True, False, False, False),
                                             (True, True, False, False), (False, False, True, False),
                                             (True, False, True, False)]
                for a, (asm, pdl, one, rev) in enumerate(runs) if dt == torch.float32 else ():
                    with _programs_reversed() if rev else contextlib.nullcontext():
                        v2, i2 = tail_select(xd, k, frontier=fr, programs=P, block=blk, workspace=ws,
                                             asm_stores=asm, pdl=pdl, one_launch=one)
                    assert not ws.hist.any(), f"{tag}: tail_select left the histograms / counter nonzero"
                    assert torch.equal(i2, i) and torch.equal(v2.view(torch.int32), v.view(torch.int32)), \
                        f"{tag}: tail_select (run {a + 1}, one_launch={one}) differs bitwise from radix_select"
                # the sieve select (one program per row): radix_select's result, bitwise
                for a in range(1 if device == "cpu" else 2):
                    paths = torch.full((R,), -1, dtype=torch.int32, device=device)
                    v2, i2 = sieve_select(xd, k, frontier=fr, paths=paths, block=blk, asm_stores=a == 1,
                                          **({"cand": max(64, 2 ** (2 * k - 1).bit_length()), "samples": (4, 8)}
                                             if device == "cpu" else {}))
                    assert torch.equal(i2, i) and torch.equal(v2.view(torch.int32), v.view(torch.int32)), \
                        f"{tag}: sieve_select (run {a + 1}) differs bitwise from radix_select"
                    sieve_paths |= set(paths.tolist())
                for a in range(1 if device == "cpu" else 2) if L <= MAX_L else ():
                    v2, i2 = row_select(xd, k, frontier=fr, asm_stores=a == 1)   # radix_select's result, bitwise
                    assert torch.equal(i2, i) and torch.equal(v2.view(torch.int32), v.view(torch.int32)), \
                        f"{tag}: row_select (run {a + 1}) differs bitwise from radix_select"
    want = set(range(5)) if device == "cpu" else {2}
    if torch.float32 not in row_dtypes:                  # the GPU's bf16 test: its rows only (docstring)
        assert sieve_paths >= want, f"sieve paths taken: {sorted(sieve_paths)}, missing {want - sieve_paths}"
        return
    # the tail select on a row built for its tail: 27 picks above the bucket, then a bucket of 39 entries sharing
    # their top 16 key bits, 9 of them above the k-th key and 8 tied at it (4 taken), interleaved by index with the
    # others; its register path in the small tile (small_cap 64) and in the large one (cap 64 > small_cap 16), both
    # ranking the bucket in one compare, in a large tile of 128 that bisects (cap 128 > small_cap 16), and its
    # streamed path (cap 16), over 1, 3 and 5 programs
    x = torch.randn(1, 300, generator=g) * 0.1
    x[0, ::7] = 1.5 + torch.randint(0, 6, (43,), generator=g).float() * 2 ** -22
    x[0, 5::11] = 3.0 + torch.rand(27, generator=g)
    x = x.to(device)
    for (cap, small), sp, one in itertools.product(((128, 64), (64, 16), (128, 16), (16, 16)), (1, 3, 5),
                                                   (False, True)):
        v, i = radix_select(x, 40, programs=sp, block=64, workspace=ws)
        gv = torch.full((3, 48), 7.0, device=device)             # outputs inside guards: no write may land outside
        gi = torch.full((3, 48), -7, dtype=torch.int32, device=device)
        v2, i2 = tail_select(x, 40, programs=sp, block=64, workspace=ws, cap=cap, small_cap=small,
                             out=(gv[1:2, :40], gi[1:2, :40]), one_launch=one)
        tag = f"tail_select cap={cap} small_cap={small} programs={sp} one_launch={one}"
        assert torch.equal(i2, i) and torch.equal(v2.view(torch.int32), v.view(torch.int32)) \
            and not ws.hist.any(), f"{tag}: differs bitwise from radix_select"
        gv[1:2, :40], gi[1:2, :40] = 7.0, -7
        assert (gv == 7.0).all() and (gi == -7).all(), f"{tag}: wrote outside its out"
    for kw, needle in (({"val": x.bfloat16()}, "val.dtype=torch.bfloat16"),
                       ({"val": x.half()}, "val.dtype=torch.float16"), ({"cap": 48}, "cap=48"),
                       ({"cap": 16, "small_cap": 32}, "small_cap=32")):
        try:
            tail_select(**{"val": x, "k": 40, **kw})
        except ValueError as e:
            assert needle in str(e) and "\n" not in str(e) and str(e).startswith("tail_select"), str(e)
        else:
            raise AssertionError(f"tail_select accepted {needle}")
    # the sieve select on a row whose order follows position (the guess from the sampled blocks lets fewer than k
    # entries through: the streamed fallback); then every path taken (0 all picks, 1 own candidates, 2 sieve, 3 the
    # guess is the k-th key, 4 fallback), each with radix_select's result
    x = torch.arange(300, dtype=torch.float32, device=device).view(1, 300)
    paths = torch.full((1,), -1, dtype=torch.int32, device=device)
    v2, i2 = sieve_select(x, 20, paths=paths, cand=64, samples=(4, 8), block=64)
    v, i = radix_select(x, 20, block=64)
    assert int(paths[0]) == 4 and torch.equal(i2, i) and torch.equal(v2, v), "sieve_select fallback on a sorted row"
    sieve_paths.add(4)
    # the k-th key by histogram digits (kth_bits 4 / 8: the guess's and the candidates') instead of bisection, fp32
    # and bf16 rows with ties, negatives and -inf: radix_select's result, bitwise
    rows = {"randn": torch.randn(3, 700, generator=g) * 3, "ties": torch.randint(0, 6, (3, 700), generator=g).float(),
            "neg": -torch.rand(3, 700, generator=g) - 1}
    rows["ties"][0, ::3] = float("-inf")
    for (nm, x), dt in itertools.product(rows.items(), (torch.float32, torch.bfloat16)):
        x = x.to(device, dt)
        v, i = radix_select(x, 12, frontier=(3, 500, 1), block=64)
        for kb in (4, 8):
            v2, i2 = sieve_select(x, 12, frontier=(3, 500, 1), cand=64, samples=(4, 8), block=64, kth_bits=kb)
            assert torch.equal(i2, i) and torch.equal(v2.view(torch.int32), v.view(torch.int32)), \
                f"sieve_select {nm} {dt} kth_bits={kb}: differs bitwise from radix_select"
    assert sieve_paths >= want, f"sieve paths taken: {sorted(sieve_paths)}, missing {want - sieve_paths}"
    # growing a workspace keeps what it outgrew (a CUDA graph captured with it writes there on replay): the shared
    # workspace above grew from 2 rows, and the indexer's per-device one keeps the smaller tables it replaces
    assert ws.outgrown and ws.rows == max(sh[0] for sh in shapes) and not ws.hist.any(), \
        "the shared SelectWorkspace did not grow as expected"
    from dsv4_lab.kernels.indexer_topk import triton as it
    it._row_selector("select", 3, device)
    dev_ws = it._SELECT_WS[str(device)]
    small = dev_ws.hist
    x = torch.randn(dev_ws.rows + 5, 300, generator=g).to(device)
    it._row_selector("select", dev_ws.rows + 5, device)(x, 20, None, None)
    assert dev_ws.rows >= x.shape[0] and any(w is small for w in dev_ws.outgrown), \
        "the indexer's select workspace was replaced without keeping the old one alive"
    # first_level=1 (digit 0 counted by the launch that wrote the rows) only with that launch's workspace, chunks
    # (programs = cdiv(L, block)) and 8-bit digits: anything else is a one-line ValueError naming what is wrong
    x = torch.randn(1, 300, generator=g).to(device)
    for kw, needle in (({"first_level": 2}, "first_level=2"), ({"first_level": 1}, "workspace=NoneType"),
                       ({"first_level": 1, "workspace": ws, "programs": 5, "block": 64}, "digit_bits=None"),
                       ({"first_level": 1, "workspace": ws, "programs": 4, "block": 64, "digit_bits": 8},
                        "programs = cdiv(L, block)")):
        try:
            radix_select(x, 20, **kw)
        except ValueError as e:
            assert needle in str(e) and "\n" not in str(e), f"radix_select {kw}: {e}"
        else:
            raise AssertionError(f"radix_select accepted {kw}")
    assert not ws.hist.any(), "a refused call wrote into the workspace"
    try:                                                 # the fused digit 0 is one query row's: decode only
        it.indexer_scores_triton(torch.randn(1, 2, 2, 16, device=device), torch.randn(1, 10, 16, device=device),
                                 torch.randn(1, 2, 2, device=device), 1, 0, level0=(ws, 3))
    except ValueError as e:
        assert "t1 - t0 = 2" in str(e) and "\n" not in str(e), str(e)
    else:
        raise AssertionError("indexer_scores_triton accepted level0 for two query rows")


# ------------------------------------------------------------------------------------------------ fake_quant
def case_fake_quant(device="cpu", big=False, dtype=torch.float32):
    from dsv4_lab.kernels.fake_quant.naive import fake_quant_naive
    from dsv4_lab.kernels.fake_quant.triton import fake_quant_triton
    from dsv4_lab.quant import fake_quant_fp8_ref, fake_quant_fp8_weight_ref, fake_quant_mxfp4_ref
    g = torch.Generator().manual_seed(4)
    # K % block != 0 (partial last groups: the kernel's index path) and K % 128 == 0 (contiguous groups)
    for shape in ([(2, 19, 300), (3, 5, 256)] if not big else [(64, 1024, 1000), (8, 512, 4096)]):
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
                tag = f"{fmt}/{blk}/{tile}/{dt}/{tuple(shape)}"
                assert torch.equal(fake_quant_triton(xd, fmt, blk, tile).view(iv), r), f"triton {tag}"
                if not tile:                # the old per-row kernel and a small-program config (many programs)
                    assert torch.equal(fake_quant_triton(xd, fmt, blk, variant="rows").view(iv), r), f"rows {tag}"
                    assert torch.equal(fake_quant_triton(xd, fmt, blk, epp=4 * blk, num_warps=4).view(iv), r), \
                        f"epp {tag}"
                if not big:
                    assert torch.equal(fake_quant_naive(xd, fmt, blk, tile).view(iv), r), f"naive {tag}"


# ------------------------------------------------------------------------------------------------ mhc
def _mhc_tol(n, d, ntok, iters, split_dot):
    """Error model of the fused mHC kernels (fp32 compute) against the fp64 naive twin, norm-wise relative.
    Each output is a chain of <= L = 4 iters dependent fp32 operations (the Sinkhorn normalisations and their
    adjoints, each O(1) roundings) fed by dot products of length <= K = n d (projection, dx) or B T (dW, dscale,
    dbase: sums over tokens). With independent roundings the error grows like u sqrt(K + L) (probabilistic bound,
    u = 2^-24); split_dot adds the relative error of the bf16 hi + lo split of each fp32 operand of the GPU's tensor
    core dots (2^-17, first order per product, not growing with K). lambda = 16 covers the bound's constant and the
    conditioning of the Sinkhorn adjoint at the tests' logits (|z| <~ 4): errors seen are ~1e-7 on CPU."""
    import math
    return 16 * ((2.0 ** -17 if split_dot else 0.0) + 2.0 ** -24 * math.sqrt(n * d + 4 * iters + ntok))


def case_mhc(device="cpu", big=False, dtype=torch.float32):
    """Fused mHC pre + post (Triton forward and backward kernels) vs the naive twin in fp64: u, coef, post's output
    and the gradients for x, fn, scale, base, y, through the model's wiring (mhc_pre(alias=True): post's dx reaches
    the pre backward kernel) and without it; a loss that also reads coef (dcoef in the A slots); odd shapes, n = 1..4,
    and a case with eps = norm_eps = 1e-2 and 3 Sinkhorn iterations, where a misplaced eps is a 1e-2 effect."""
    from dsv4_lab.kernels.mhc import triton as mt
    from dsv4_lab.kernels.mhc.naive import mhc_post_naive, mhc_pre_naive
    from dsv4_lab.kernels.mhc.triton import mhc_post_triton, mhc_pre_triton
    g = torch.Generator().manual_seed(5)
    # (B, T, n, d, iters, eps)
    shapes = [(2, 9, 4, 40, 20, 1e-6), (1, 5, 3, 24, 20, 1e-6), (1, 3, 2, 16, 20, 1e-6), (1, 4, 1, 8, 20, 1e-6),
              (1, 6, 4, 24, 3, 1e-2)] if not big else \
        [(4, 4096, 4, 384, 20, 1e-6), (1, 333, 4, 1024, 20, 1e-6), (1, 77, 2, 256, 20, 1e-6)]
    for si, (B, T, n, d, iters, eps) in enumerate(shapes):
        G = 2 + n
        x0 = torch.randn(B, T, n, d, generator=g).to(device)
        fn0 = (torch.randn(G * n, n * d, generator=g) * 0.05).to(device)
        sc0 = torch.tensor([0.5, 0.7, 0.9]).to(device)
        base0 = torch.randn(G * n, generator=g).to(device)
        y0 = torch.randn(B, T, d, generator=g).to(device)
        gu = torch.randn(B, T, d, generator=g).to(device)
        go = torch.randn(B, T, n, d, generator=g).to(device)
        gc = torch.randn(B, T, G * n, generator=g).to(device)

        def run(pre, post, dt, ft, alias):
            ins = [x0.to(dt), fn0.to(ft), sc0.to(ft), base0.to(ft), y0.to(dt)]
            ins = [t.requires_grad_(True) for t in ins]
            u, coef, *xa = pre(*ins[:4], iters, eps, eps, **({"alias": True} if alias else {}))
            out = post(ins[4], xa[0] if alias else ins[0], coef)
            loss = (u.to(ft) * gu.to(ft)).sum() + (out.to(ft) * go.to(ft)).sum() + (coef.to(ft) * gc.to(ft)).sum()
            return [u, coef, out] + list(torch.autograd.grad(loss, ins))

        ref = run(mhc_pre_naive, mhc_post_naive, torch.float64, torch.float64, False)
        yard = run(mhc_pre_naive, mhc_post_naive, dtype, torch.float32, False) if dtype != torch.float32 else \
            [None] * len(ref)
        tol = _mhc_tol(n, d, B * T, iters, device != "cpu")
        for alias in ((True, False) if device == "cpu" and si == 0 else (True,)):
            got = run(mhc_pre_triton, mhc_post_triton, dtype, torch.float32, alias)
            for nm, a, r, y in zip(["u", "coef", "post", "dx", "dfn", "dscale", "dbase", "dy"], got, ref, yard):
                _check(f"mhc {nm} {(B, T, n, d)} alias={alias}", a, r, y, tol)
        if device == "cpu" and si == 0:
            # the GPU's split projection (W = bf16 hi + lo, x split too when fp32; in the backward rho dmu split
            # too), emulated with fp32 dots of the bf16-rounded parts: forward and the pre backward kernels
            ins = [t.double().requires_grad_(True) for t in (x0, fn0, sc0, base0)]
            u_r, c_r = mhc_pre_naive(*ins, iters, eps, eps)
            gr = torch.autograd.grad((u_r * gu.double()).sum() + (c_r * gc.double()).sum(), ins)
            tol_s = _mhc_tol(n, d, B * T, iters, True)
            u_s, c_s, mu, rho = mt.mhc_pre_fwd(x0, fn0, sc0, base0, iters, eps, eps, dot="bf16x3", save=True)
            _check("mhc u (bf16x3)", u_s, u_r.detach(), tol=tol_s)
            _check("mhc coef (bf16x3)", c_s, c_r.detach(), tol=tol_s)
            # one persistent program walking both token blocks (scratch reused), dW split over 2 token ranges
            old = (mt.BWD_CPS, mt.DW_BT)
            mt.BWD_CPS, mt.DW_BT = 1, 16
            try:
                gs = mt.mhc_pre_bwd(x0, fn0, sc0, base0, mu, rho, gu, gc, None, iters, eps, dot="bf16x3")
            finally:
                mt.BWD_CPS, mt.DW_BT = old
            for nm, a, r in zip(["dx", "dfn", "dscale", "dbase"], gs, gr):
                _check(f"mhc pre {nm} (bf16x3)", a, r, tol=tol_s)
        # the other way of forming u (mix="split": coef kernel without pass 2 + the elementwise mix launch)
        other = "split" if mt.PRE_MIX == "fused" else "fused"
        u_m, c_m = mt.mhc_pre_fwd(x0.to(dtype), fn0, sc0, base0, iters, eps, eps, mix=other)
        _check(f"mhc u (mix={other})", u_m, ref[0].detach(), yard[0].detach() if yard[0] is not None else None, tol)
        _check(f"mhc coef (mix={other})", c_m, ref[1].detach(), yard[1].detach() if yard[1] is not None else None,
               tol)
        # the post's two program orders (POST_TOKEN_MAJOR) over several channel blocks (POST_BD 16): each entry is
        # the same arithmetic, so the same bits; against the naive post on the same coef in fp64
        old = (mt.POST_TOKEN_MAJOR, mt.POST_BD)
        posts = []
        try:
            for tmaj in (False, True):
                mt.POST_TOKEN_MAJOR, mt.POST_BD = tmaj, 16
                posts.append(mt.mhc_post_fwd(y0.to(dtype), x0.to(dtype), c_m))
        finally:
            mt.POST_TOKEN_MAJOR, mt.POST_BD = old
        assert torch.equal(posts[0], posts[1]), f"mhc post {(B, T, n, d)}: the program orders differ"
        q_r = mhc_post_naive(y0.to(dtype).double(), x0.to(dtype).double(), c_m.double())
        _check(f"mhc post (token-major, BD 16) {(B, T, n, d)}", posts[1], q_r,
               mhc_post_naive(y0.to(dtype), x0.to(dtype), c_m) if dtype != torch.float32 else None, tol)


# ------------------------------------------------------------------------------------------------ split-KV decode
def _decode_inputs(g, device, dtype, B, T, H, D, Tk, S):
    """fp32 inputs (drawn on the GPU at GPU sizes: 1M-row caches) and the kernel's copies in `dtype`."""
    mk = (lambda *s: torch.randn(*s, generator=g, device=device)) if device != "cpu" else \
        (lambda *s: torch.randn(*s, generator=g))
    q, kv, comp = mk(B, T, H, D), mk(B, Tk, D), mk(B, S, D)
    return (q, kv, comp), (q.to(dtype), kv.to(dtype), comp.to(dtype))


def _decode_check(name, o, lse, ref_fn, yard_fn, dtype, device):
    o_r, l_r = ref_fn()
    tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 2e-3
    yo, yl = yard_fn() if dtype != torch.float32 else (None, None)
    _check(f"{name} o", o, o_r, yo, tol)
    inf_t, inf_r = torch.isinf(lse), torch.isinf(l_r)
    assert torch.equal(inf_t, inf_r), f"{name}: lse -inf pattern differs"
    _check(f"{name} lse", lse[~inf_t], l_r[~inf_r], None if yl is None else yl[~inf_r], tol)


def case_sparse_decode(device="cpu", big=False, dtype=torch.float32):
    """Split-KV (flash-decoding) sparse forward (sparse_attn/triton_decode.py) vs the naive twin, fp64 reference:
    decode at a q_offset, B = 2, T = 1 and 3, -1 / out-of-range / repeated picks, sink random / -inf / None,
    window 0, caches shorter than the window, one split, more splits requested than blocks, nothing visible;
    and the dispatch: sparse_attn_fwd without grad returns the split path's result bit for bit."""
    from dsv4_lab.kernels.sparse_attn.naive import sparse_attn_naive
    from dsv4_lab.kernels.sparse_attn.triton import sparse_attn_fwd
    from dsv4_lab.kernels.sparse_attn.triton_decode import sparse_attn_decode_fwd, use_decode_path
    g = torch.Generator(device=device if big else "cpu").manual_seed(11)
    # (B, T, H, D, Tk, S, K, W, sink, num_splits)
    shapes = [(2, 1, 3, 24, 40, 9, 7, 5, "rand", None), (2, 3, 16, 32, 50, 20, 37, 8, "-inf", 3),
              (1, 1, 4, 16, 30, 5, 6, 0, None, 1), (2, 3, 4, 16, 3, 5, 40, 4, "rand", 100),
              (1, 2, 2, 16, 6, 4, 5, 0, None, None)] if not big else \
        [(1, 1, 16, 128, 1 << 20, 1 << 18, 512, 128, "rand", None), (64, 1, 16, 128, 1 << 17, 1 << 15, 512, 128,
                                                                     "rand", None),
         (2, 16, 16, 128, 1 << 20, 1 << 18, 512, 128, "rand", None)]
    for n, (B, T, H, D, Tk, S, K, W, sk, ns) in enumerate(shapes):
        (q, kv, comp), (qd, kvd, cd) = _decode_inputs(g, device if big else "cpu", dtype, B, T, H, D, Tk, S)
        q, kv, comp, qd, kvd, cd = [t.to(device) for t in (q, kv, comp, qd, kvd, cd)]
        if n == 1:                                                  # batched cache slices (B, :Tk): not contiguous
            kvd, cd = torch.cat([kvd, kvd * 0 + 9], 1)[:, :Tk], torch.cat([cd, cd * 0 + 9], 1)[:, :S]
        idx = torch.randint(-1, S + 2, (B, T, K), generator=g, device=g.device).to(device)   # -1 and S+1 masked
        idx[..., 1] = idx[..., 0]                                                          # repeated pick
        if n == 4:
            idx.fill_(-1)                                                                  # nothing visible at all
        sink = torch.randn(H, generator=g, device=g.device).to(device) if sk else None
        if sk == "-inf":
            sink[::2] = float("-inf")
        q_off, sc = Tk - T, D ** -0.5
        o, lse = sparse_attn_decode_fwd(qd, kvd, cd, idx, sink, sc, W, q_off, num_splits=ns)
        _decode_check(f"sparse decode {n}", o, lse,
                      lambda: sparse_attn_naive(q.double(), kv.double(), comp.double(), idx,
                                                None if sink is None else sink.double(), sc, W, q_off, return_lse=True),
                      lambda: sparse_attn_naive(qd, kvd, cd, idx, sink, sc, W, q_off, return_lse=True), dtype, device)
        if n == 4:
            assert (o == 0).all() and torch.isinf(lse).all(), "nothing visible, no sink: o = 0, lse = -inf"
        if ns is None:
            assert use_decode_path(qd, kvd, cd) and not use_decode_path(qd.requires_grad_(True), kvd, cd)
            qd.requires_grad_(False)
            o2, l2 = sparse_attn_fwd(qd, kvd, cd, idx, sink, sc, W, q_off)
            assert torch.equal(o2, o) and torch.equal(l2, lse), "sparse_attn_fwd did not take the split-KV path"


def case_hca_decode(device="cpu", big=False, dtype=torch.float32):
    """Split-KV (flash-decoding) HCA forward (hca_attn/triton_decode.py) vs the naive twin, fp64 reference: decode at
    a q_offset, B = 2, T = 1, 3, 5 (several query blocks of one program when H is small), odd entry counts, sink
    random / -inf / None, window 0, fewer visible entries than one split, nothing visible; the dispatch: hca_attn_fwd
    without grad returns the split path's result bit for bit."""
    from dsv4_lab.kernels.hca_attn.naive import hca_attn_naive
    from dsv4_lab.kernels.hca_attn.triton import hca_attn_fwd
    from dsv4_lab.kernels.hca_attn.triton_decode import hca_attn_decode_fwd, use_decode_path
    g = torch.Generator(device=device if big else "cpu").manual_seed(12)
    # (B, T, H, D, Tk, W, R, sink, num_splits)
    shapes = [(2, 1, 3, 24, 43, 6, 4, "rand", None), (2, 3, 16, 32, 50, 5, 4, "-inf", 3),
              (1, 1, 4, 16, 30, 0, 4, None, 1), (2, 3, 4, 16, 9, 4, 8, "rand", 100),
              (1, 5, 2, 16, 5, 3, 3, None, 2), (2, 1, 2, 16, 3, 0, 4, None, None)] if not big else \
        [(1, 1, 16, 128, 1 << 20, 128, 128, "rand", None), (64, 1, 16, 128, 1 << 17, 128, 128, "rand", None),
         (2, 16, 16, 128, 1 << 20, 128, 128, "rand", None), (1, 3, 16, 128, 131071, 128, 128, "-inf", None)]
    for n, (B, T, H, D, Tk, W, R, sk, ns) in enumerate(shapes):
        S = Tk // R
        (q, kv, comp), (qd, kvd, cd) = _decode_inputs(g, device if big else "cpu", dtype, B, T, H, D, Tk, S)
        q, kv, comp, qd, kvd, cd = [t.to(device) for t in (q, kv, comp, qd, kvd, cd)]
        if n == 1:                                                  # batched cache slices (B, :Tk): not contiguous
            kvd, cd = torch.cat([kvd, kvd * 0 + 9], 1)[:, :Tk], torch.cat([cd, cd * 0 + 9], 1)[:, :S]
        sink = torch.randn(H, generator=g, device=g.device).to(device) if sk else None
        if sk == "-inf":
            sink[::2] = float("-inf")
        q_off, sc = Tk - T, D ** -0.5
        o, lse = hca_attn_decode_fwd(qd, kvd, cd, sink, sc, W, R, q_off, num_splits=ns)
        _decode_check(f"hca decode {n}", o, lse,
                      lambda: hca_attn_naive(q.double(), kv.double(), comp.double(),
                                             None if sink is None else sink.double(), sc, W, R, q_off, return_lse=True),
                      lambda: hca_attn_naive(qd, kvd, cd, sink, sc, W, R, q_off, return_lse=True), dtype, device)
        if n == 5 and not big:
            assert (o == 0).all() and torch.isinf(lse).all(), "nothing visible, no sink: o = 0, lse = -inf"
        if ns is None:
            assert use_decode_path(qd, kvd, cd) and not use_decode_path(qd, kvd.requires_grad_(True), cd)
            kvd.requires_grad_(False)
            o2, l2 = hca_attn_fwd(qd, kvd, cd, sink, sc, W, R, q_off)
            assert torch.equal(o2, o) and torch.equal(l2, lse), "hca_attn_fwd did not take the split-KV path"


# ------------------------------------------------------------------------------------------------ sparse_kl
def case_sparse_kl(device="cpu", big=False, dtype=torch.float32):
    """Sparse-stage indexer KL (kernels/sparse_kl): loss and the qI / kI / w gradients vs the naive twin (fp64).
    lse is a real log-normaliser (logsumexp over the valid picks plus some window / sink mass), so the target
    p sums to < 1 per head as in the model. Tiny shapes: odd T, non-power-of-two H / c / n_I / c_I, K not a multiple
    of the interpreter's BLOCK_K (16) and K < 16, -1 and >= S picks, repeated picks, a row with no valid pick (and
    -inf lse), rows whose target underflows to all zero (huge lse), a forward without grad (no p buffer)."""
    from dsv4_lab.kernels.sparse_kl.naive import sparse_kl_naive
    from dsv4_lab.kernels.sparse_kl.triton import sparse_kl_triton
    g = torch.Generator().manual_seed(13)
    shapes = [(2, 13, 3, 24, 5, 20, 9, 37), (1, 7, 5, 40, 3, 12, 4, 5)] if not big else \
        [(2, 2048, 8, 128, 4, 64, 1024, 512)]
    for (B, T, H, c, nI, cI, S, K) in shapes:
        q = torch.randn(B, T, H, c, generator=g)
        comp = torch.randn(B, S, c, generator=g)
        qI = torch.randn(B, T, nI, cI, generator=g)
        kI = torch.randn(B, S, cI, generator=g)
        w = torch.randn(B, T, nI, generator=g) * (nI * cI) ** -0.5
        idx = torch.randint(0, S, (B, T, K), generator=g)
        idx[..., ::5] = -1                                              # no pick
        idx[..., 1] = S + 2                                             # out of range
        idx[..., 2] = idx[..., 3]                                       # repeated pick (counted twice)
        sc = c ** -0.5
        extra = torch.randn(B, T, H, generator=g).to(device).double()
        with torch.no_grad():                                           # lse = log(sum over picks + extra mass)
            s = idx.to(device).long()
            valid = (s >= 0) & (s < S)
            ec = comp.to(device)[torch.arange(B, device=device)[:, None, None], s.clamp(0, S - 1)]   # (B, T, K, c)
            z = torch.einsum("bthd,btkd->bthk", q.to(device).double(), ec.double()) * sc
            lse = torch.logaddexp(torch.logsumexp(z.masked_fill(~valid[:, :, None], -1e300), -1), extra).float()
            del ec, z
        if not big:
            idx[0, 4] = -1                                              # a row with no valid pick ...
            lse[0, 4, 0] = float("-inf")                                # ... and a head without any entry
            lse[B - 1, T - 2] = 1e4                                     # target underflows to all zero
        ts = [t.to(device) for t in (q, comp, qI, kI, w)]
        idx_d, lse_d = idx.to(device), lse
        leaf = [t.to(dtype).requires_grad_(True) for t in ts[2:]]
        l_t = sparse_kl_triton(ts[0].to(dtype), ts[1].to(dtype), idx_d, lse_d, sc, *leaf)
        gr_t = torch.autograd.grad(l_t, leaf)
        ref_in = [t.double().requires_grad_(True) for t in ts[2:]]
        l_r = sparse_kl_naive(ts[0].double(), ts[1].double(), idx_d, lse_d.double(), sc, *ref_in)
        gr_r = torch.autograd.grad(l_r, ref_in)
        yard, gr_y = None, [None] * 3
        if dtype != torch.float32:
            yin = [t.to(dtype).requires_grad_(True) for t in ts[2:]]
            yard = sparse_kl_naive(ts[0].to(dtype), ts[1].to(dtype), idx_d, lse_d, sc, *yin)
            gr_y = torch.autograd.grad(yard, yin)
        tol = 1e-5 if dtype == torch.float32 and device == "cpu" else (2e-4 if dtype == torch.float32 else 2e-3)
        assert l_t.dim() == 0 and l_t.dtype == torch.float32, f"loss {tuple(l_t.shape)} {l_t.dtype}"
        # The loss is a KL = sum t (log t - log q) that cancels: each term carries ~4 fp32 roundings (exp(z - lse),
        # the target's normalisation, log_softmax, the product), so its relative error is 4 u32 x kappa, kappa =
        # sum |t| (|log t| + |log q|) / KL (fp64; 31 and 264 on the two CPU shapes).
        with torch.no_grad():
            s = idx_d.long()
            ok = (s >= 0) & (s < S)
            rows_b = torch.arange(B, device=device)[:, None, None]
            ecd, kgd = ts[1].double()[rows_b, s.clamp(0, S - 1)], ts[3].double()[rows_b, s.clamp(0, S - 1)]
            p = torch.exp(torch.einsum("bthd,btkd->bthk", ts[0].double(), ecd) * sc - lse_d.double()[..., None]).sum(2)
            sco = torch.einsum("bthk,bth->btk", torch.einsum("bthd,btkd->bthk", ts[2].double(), kgd).relu(),
                               ts[4].double())
            t = torch.where(ok, p, 0.0)
            kept = t.sum(-1) > 0
            t = t / t.sum(-1, keepdim=True).clamp_min(1e-300)
            logq = torch.log_softmax(sco.masked_fill(~ok, -1e9), -1)
            mag = ((t * (torch.log(t.clamp_min(1e-300)).abs() + logq.abs())).sum(-1) * kept).sum() / kept.sum()
            kappa = (mag / l_r.detach().abs().clamp_min(1e-300)).item()
            del ecd, kgd
        _check("sparse_kl loss", l_t, l_r, yard, tol + 4 * kappa * 2.0 ** -24)
        for nm, a, r, y in zip(["dqI", "dkI", "dw"], gr_t, gr_r, gr_y):
            assert a.dtype == dtype, f"sparse_kl {nm} dtype {a.dtype}"
            _check(f"sparse_kl {nm}", a, r, y, tol * 4)
        # forward only (no p buffer): a specialization of its own (STORE_P is in the autotune key), which may tune to
        # another BLOCK_K and so sum the fp32 lanes in another order: the same error model as the forward with grad,
        # bitwise only under the interpreter (one config)
        with torch.no_grad():
            l_ng = sparse_kl_triton(ts[0].to(dtype), ts[1].to(dtype), idx_d, lse_d, sc, *[t.detach() for t in leaf])
        if device == "cpu":
            assert torch.equal(l_ng, l_t.detach()), "sparse_kl forward differs without grad"
        _check("sparse_kl loss without grad", l_ng, l_r, yard, tol + 4 * kappa * 2.0 ** -24)
    # every row's target all zero: loss 0, gradients 0
    if not big:
        B, T, H, c, nI, cI, S, K = 1, 3, 2, 16, 2, 16, 4, 3
        qI = torch.randn(B, T, nI, cI, generator=g).to(device).requires_grad_(True)
        kI = torch.randn(B, S, cI, generator=g).to(device).requires_grad_(True)
        w = torch.randn(B, T, nI, generator=g).to(device).requires_grad_(True)
        idx = torch.randint(-1, S, (B, T, K), generator=g).to(device)
        lse = torch.full((B, T, H), 1e4, device=device)
        l_t = sparse_kl_triton(torch.randn(B, T, H, c, device=device), torch.randn(B, S, c, device=device), idx, lse,
                               0.25, qI, kI, w)
        grads = torch.autograd.grad(l_t, [qI, kI, w])
        assert l_t.item() == 0.0 and all((x == 0).all() for x in grads), "no kept row: loss and grads must be 0"


# ------------------------------------------------------------------------------------------------ rope
def case_rope(device="cpu", big=False, dtype=torch.float32):
    """kernels/rope: the fused interleaved partial RoPE (forward and the gradient of x) against the fp64 naive twin on
    the same table rows: (B, T, H, D) and (B, T, D) rows, a rope part smaller than the row (D - r copied: checked
    bit for bit) and the whole row, positions (T,) with an offset and (B, T) per sequence, inverse on and off.
    Error model: each rotated element is two fp32 products and a sum of values |x| <= ~4 (relative error a few u32,
    6e-8 x the row's norm), the copied part exact: 1e-6 on the CPU; on the GPU 2e-4 for fp32 (FMA contraction), bf16
    within 2x the naive twin run in bf16 plus 2e-3."""
    from dsv4_lab.kernels.rope import apply_rope
    from dsv4_lab.kernels.rope.triton import rope_triton
    from dsv4_lab.rope import RotaryTable
    g = torch.Generator().manual_seed(13)
    shapes = [((2, 7, 3, 20), 8), ((2, 5, 12), 12), ((2, 9, 4, 16), 16)] if not big else \
        [((4, 1024, 8, 128), 64), ((2, 2048, 128), 64)]
    for shape, r in shapes:
        tab = RotaryTable(r, 4096, 10000.0).to(device)
        B, T = shape[:2]
        for per_seq in (False, True):
            pos = (torch.arange(T) + 11) if not per_seq else torch.stack([torch.arange(T) + 3 * b for b in range(B)])
            pos = pos.to(device)
            for inverse in (False, True):
                x = torch.randn(*shape, generator=g).to(device)
                gy = torch.randn(*shape, generator=g).to(device)

                def run(fn, dt):
                    xx = x.to(dt).requires_grad_(True)
                    y = fn(xx)
                    return [y, torch.autograd.grad(y, xx, gy.to(dt))[0]]
                got = run(lambda xx: rope_triton(xx, tab.cos, tab.sin, pos, inverse), dtype)
                ref = run(lambda xx: apply_rope(xx, tab.cos.double()[pos], tab.sin.double()[pos], inverse),
                          torch.float64)
                yard = run(lambda xx: apply_rope(xx, tab.cos[pos], tab.sin[pos], inverse), dtype) \
                    if dtype != torch.float32 else [None, None]
                tol = 1e-6 if device == "cpu" else (2e-4 if dtype == torch.float32 else 2e-3)
                tag = f"rope {shape} r{r} pos{'(B,T)' if per_seq else '(T,)'} inverse={inverse}"
                for nm, a, rr, y in zip(["out", "dx"], got, ref, yard):
                    _check(f"{tag} {nm}", a, rr, y, tol)
                assert torch.equal(got[0][..., :shape[-1] - r], x.to(dtype)[..., :shape[-1] - r]), \
                    f"{tag}: the unrotated dims are not copied exactly"


# ------------------------------------------------------------------------------------------------ swiglu
def case_swiglu(device="cpu", big=False, dtype=torch.float32):
    """kernels/swiglu: the fused clamped SwiGLU (forward, and the gradients of gate, up and the routing weight)
    against the fp64 naive twin: rows not a multiple of the row block, I not a multiple of the column block, gate and
    up as the two halves of one (R, 2I) tensor (strided rows, as the MoE's grouped path passes them), clamp on (L
    inside the input range, so both clamps cut) and off, with and without a weight. Error model: each output is a
    handful of fp32 operations on one element (relative error a few u32 = 6e-8; sigmoid's exp differs from torch's
    by an ulp or two), the weight gradient a row sum of I terms (I u32 worst case): 1e-5 on the CPU; on the GPU
    2e-4 for fp32, and for bf16 inputs 2x the naive twin run on the same bf16 inputs plus 2e-3."""
    from dsv4_lab.kernels.swiglu.naive import swiglu_naive
    from dsv4_lab.kernels.swiglu.triton import swiglu_triton
    g = torch.Generator().manual_seed(11)
    shapes = [(7, 24), (5, 40), (1, 3)] if not big else [(4099, 256), (1000, 1024)]
    for R, I in shapes:
        for limit in (0.0, 1.5):
            for with_w in (False, True):
                h = (torch.randn(R, 2 * I, generator=g) * 2.0).to(device)
                w = torch.rand(R, 1, generator=g).to(device) if with_w else None
                dy = torch.randn(R, I, generator=g).to(device)

                def run(fn, hh, ww, dt):
                    hh = hh.detach().to(dt).requires_grad_(True)
                    ww = ww.detach().clone().requires_grad_(True) if ww is not None else None
                    gate, up = hh.chunk(2, dim=-1)
                    y = fn(gate, up, limit, ww, out_dtype=dt)
                    grads = torch.autograd.grad(y, [hh] + ([ww] if ww is not None else []), dy.to(dt))
                    return [y] + list(grads)
                got = run(swiglu_triton, h, w, dtype)
                ref = run(swiglu_naive, h.double(), w.double() if w is not None else None, torch.float64)
                yard = run(swiglu_naive, h, w, dtype) if dtype != torch.float32 else [None] * len(got)
                tol = 1e-5 if device == "cpu" else (2e-4 if dtype == torch.float32 else 2e-3)
                for nm, a, r, y in zip(["out", "dh", "dw"], got, ref, yard):
                    _check(f"swiglu R{R} I{I} L{limit} w={with_w} {nm}", a, r, y, tol)


# ------------------------------------------------------------------------------------------------ rmsnorm
def _rmsnorm_ref_bound(x, w, gy, eps, out_dtype, w_dtype, interpret):
    """fp64 references (y, dx, dw) of y = RMSNorm_w(x) (w None: RMSNorm_1) with the incoming gradient gy, from the
    inputs as given (already rounded to their dtype), and per-element bounds on the error of an fp32 computation of
    them stored in out_dtype (y, dx) and w_dtype (dw).

    Error model (worst case, any summation order, u = 2^-24; only per-element fp32 roundings, no BLAS): the sum of
    the D squares is a sum of non-negative terms, relative error <= D u whatever the order; / D, eps rounded to fp32,
    + eps, sqrt (halves it) and 1 / (2 u for the GPU's div.full) leave rstd within e_r = (D / 2 + 5) u.
    y = x rstd w: e_r + 2 u relative. dx = rstd (g - xh c), g = w dy, xh = x rstd, c = mean(xh g), S = mean|xh g|:
    xh g carries e_r + 3 u, its signed sum adds D u S, so c is within (e_r + (D + 3) u) S + u |c|; to first order
        |d dx| <= (1.5 D + 12) u rstd (|g| + |xh| (|c| + S)).
    dw = sum over the N rows of dy xh: (e_r + (N + 1) u) sum |dy xh|, whatever the split into partial sums.
    Each bound is doubled (second-order terms, FMA contraction only removes roundings), then the store in a 16-bit
    dtype adds its unit roundoff times |ref| + the fp32 bound: 2^-8 for bf16 on the GPU (round to nearest), 2^-7
    under the interpreter (interpret=True), whose fp32 -> bf16 cast truncates (docs/kernels.md §7 item 3)."""
    from dsv4_lab.kernels.rmsnorm.naive import rms_norm_naive
    U = 2.0 ** -24
    D = x.shape[-1]
    N = x.numel() // D
    xd = x.detach().double().requires_grad_(True)
    wd = w.detach().double().requires_grad_(True) if w is not None else None
    gd = gy.double()
    y = rms_norm_naive(xd, wd, eps)
    grads = torch.autograd.grad(y, [xd] + ([wd] if w is not None else []), gd)
    xd, wd = xd.detach(), wd.detach() if w is not None else None
    r = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    xh = xd * r
    g = gd * wd if w is not None else gd
    c, S = (xh * g).mean(-1, keepdim=True), (xh * g).abs().mean(-1, keepdim=True)
    assert torch.allclose(grads[0], r * (g - xh * c), rtol=1e-9, atol=1e-12), "dx formula vs fp64 autograd"
    e_r = (D / 2 + 5) * U
    unit = {torch.float32: 0.0, torch.bfloat16: 2.0 ** (-7 if interpret else -8), torch.float16: 2.0 ** -11}
    uo, uw = unit[out_dtype], unit[w_dtype]
    b_y = 2 * (e_r + 2 * U) * y.detach().abs()
    b_dx = 2 * (1.5 * D + 12) * U * r * (g.abs() + xh.abs() * (c.abs() + S))
    out = [(y.detach(), b_y + uo * (y.detach().abs() + b_y)), (grads[0], b_dx + uo * (grads[0].abs() + b_dx))]
    if w is not None:
        b_dw = 2 * (e_r + (N + 1) * U) * (gd * xh).abs().reshape(-1, D).sum(0)
        assert torch.allclose(grads[1], (gd * xh).reshape(-1, D).sum(0), rtol=1e-9, atol=1e-12), "dw formula"
        out.append((grads[1], b_dw + uw * (grads[1].abs() + b_dw)))
    return out


def case_rmsnorm(device="cpu", big=False, dtype=torch.float32):
    """kernels/rmsnorm: the fused RMSNorm (forward, and the gradients of x and of the weight) against the fp64 naive
    twin, element by element within the error model of `_rmsnorm_ref_bound`: 2-D, 3-D and 4-D x, D not a power of
    two, row counts not a multiple of the row block (and, for the weight gradient, rows spread over several programs
    of several row blocks each), with a weight (fp32, and in x's dtype), a weight not requiring grad, weightless;
    rows of very different scales (1e-3: mean(x^2) ~ eps, so eps is checked; an all-zero row; 30), x as a strided
    slice, the incoming gradient as a strided slice (row stride D + 5) or transposed (last dim strided: copied).
    On the CPU the case runs fp32 and bf16 inputs (the GPU test runs each dtype). Also: RMSNorm(impl="triton") and
    rms_norm(impl="triton") take this kernel."""
    from dsv4_lab.kernels.rmsnorm import rms_norm
    from dsv4_lab.kernels.rmsnorm.triton import rms_norm_triton
    from dsv4_lab.layers import RMSNorm
    g = torch.Generator().manual_seed(17)
    eps = 1e-6
    # (shape, weight: None | "grad" | "nograd", x a strided slice, gy: None (contiguous) | "slice" | "t")
    shapes = [((7, 20), "grad", False, None), ((2, 5, 37), "grad", True, "slice"), ((2, 3, 5, 12), None, False, "t"),
              ((3, 4, 2, 24), "grad", False, "t"), ((5, 6, 20), "grad", False, None),
              ((9, 130), "nograd", True, "slice"), ((2, 5, 37), None, False, None)] if not big else \
        [((4, 2048, 384), "grad", False, None), ((2, 1024, 16, 128), None, False, None),
         ((300, 7168), "grad", True, "t"), ((64, 8192), "grad", False, "slice"),
         ((3, 333, 1000), "nograd", False, None)]
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (dtype,)
    for shape, wmode, strided, gy_mode in shapes:
        D = shape[-1]
        R = int(torch.tensor(shape[:-1]).prod())
        scale = torch.exp(torch.randn(R, 1, generator=g))
        scale[0], scale[R // 2], scale[-1] = 1e-3, 0.0, 30.0
        x0 = (torch.randn(R, D + (7 if strided else 0), generator=g) * scale)
        w0 = 1 + 0.5 * torch.randn(D, generator=g) if wmode else None
        gy0 = torch.randn(*{None: (R, D), "t": (D, R), "slice": (R, D + 5)}[gy_mode], generator=g)
        gy_view = {None: lambda t: t, "t": lambda t: t.t(), "slice": lambda t: t[:, 2:D + 2]}[gy_mode]
        for dt in dtypes:
            for wdt in ((torch.float32, dt) if wmode and dt != torch.float32 else (torch.float32,)):
                xx = x0.to(device=device, dtype=dt)[:, :D].unflatten(0, shape[:-1])
                assert strided == (not xx.is_contiguous())
                ww = w0.to(device=device, dtype=wdt) if wmode else None
                gy = gy_view(gy0.to(device=device, dtype=dt)).unflatten(0, shape[:-1])
                assert (gy_mode is None) == gy.is_contiguous()
                xl = xx.detach().requires_grad_(True)
                wl = ww.detach().requires_grad_(wmode == "grad") if wmode else None
                y = rms_norm_triton(xl, wl, eps)
                got = [y] + list(torch.autograd.grad(y, [xl] + ([wl] if wmode == "grad" else []), gy))
                ref = _rmsnorm_ref_bound(xx, ww, gy, eps, dt, wdt, device == "cpu")[:len(got)]
                tag = f"rmsnorm {shape} w={wmode}:{str(wdt)[6:]} {str(dt)[6:]} strided={strided} gy={gy_mode}"
                assert y.dtype == dt and y.shape == xx.shape and got[1].dtype == dt, f"{tag}: dtype / shape"
                if wmode == "grad":
                    assert got[2].dtype == wdt and got[2].shape == (D,), f"{tag}: weight grad dtype / shape"
                for nm, a, (rr, bb) in zip(["out", "dx", "dw"], got, ref):
                    _bound_ok(f"{tag} {nm}", a, rr, bb)
                if wmode == "grad" and dt == torch.float32 and not big:
                    with torch.no_grad():
                        mod = RMSNorm(D, eps, impl="triton").to(device)
                        mod.weight.copy_(ww)
                        assert torch.equal(mod(xx), y) and torch.equal(rms_norm(xx, ww, eps, "triton"), y), \
                            f"{tag}: the module / dispatcher does not take the kernel"
                        assert torch.equal(rms_norm(xx, None, eps, "triton"), rms_norm_triton(xx, None, eps))


# ------------------------------------------------------------------------------------------------ compressor_pool
def _pool_ref_bound(C, Z, ape, w, eps, overlap, pC=None, pZ=None, cos=None, sin=None, first_block=0):
    """fp64 reference y = RMSNorm_w(pool(C, Z + ape)) of the compressor pool (with cos / sin: then RoPE of entry i at
    position (first_block + i) m on its last r channels) and a per-element bound on the error of an fp32 computation
    of it from the same fp32 inputs and tables (docs/kernels.md §11).

    Error model (worst case, Higham's gamma_n ~ n u, u = 2^-24): per channel, x = sum_j p_j C_j with p = softmax of
    the S <= 2m (or m) slot scores z_j. Each weight p_j carries a relative error <= (2 S + 16 + 4 max_j |z_j|) u: the
    fp32 sum z = Z + ape and z - max round by |z| u, exp turns that into a relative error, the sums of S terms and the
    division add S u + a few u. So |dx| <= a u s with s = sum_j p_j |C_j| and a = 2 S + 16 + 4 max |z| (the weighted
    sum's own rounding is in the 2 S). The RMSNorm scale rs = 1 / sqrt(mean(x^2) + eps) then moves by
    ||dx|| / ||x|| + (c / 2 + 8) u (sum of c squares, sqrt, division, two products), so
        |dy_ch| <= |w_ch| rs (a u s_ch + |x_ch| ((c / 2 + 8) u + a u ||s|| / ||x||)).
    RoPE: a rotated pair (y0, y1) -> (y0 cos - y1 sin, y0 sin + y1 cos) with the same table values on both sides
    (|cos|, |sin| <= 1). Errors b0, b1 of the inputs pass as |cos| b0 + |sin| b1 (resp. |sin| b0 + |cos| b1); the two
    products and the sum round by at most 2 u (|y0| + |y1|) (an FMA only removes one), 3 u here to cover the
    second-order terms. The channels below c - r (and all channels without tables) keep the pool's bound.
    Returns (y_ref (B, n, c) fp64, bound (B, n, c))."""
    from dsv4_lab.kernels.compressor_pool.naive import compressor_pool_naive, pool_overlap, pool_plain
    d = [None if t is None else t.double() for t in (C, Z, ape, w, pC, pZ)]
    C, Z, ape, w, pC, pZ = d
    U32 = 2.0 ** -24
    zf = Z + ape if ape is not None else Z
    c = C.shape[-1] // (2 if overlap else 1)
    za = zf[..., -c:].abs().amax(2)                                     # (B, n, c) max |z| over the a / plain slots
    if overlap:
        x = pool_overlap(C, zf, pC, pZ)
        s = pool_overlap(C.abs(), zf, None if pC is None else pC.abs(), pZ)
        zb = torch.cat([pZ[:, None] if pZ is not None else zf[:, :1, :, :c].new_zeros(zf.shape[0], 1, *zf.shape[2:3],
                                                                                      c), zf[:, :-1, :, :c]], 1)
        za = torch.maximum(za, torch.where(torch.isfinite(zb), zb.abs(), 0.0).amax(2))
        S = 2 * C.shape[2]
    else:
        x, s, S = pool_plain(C, zf), pool_plain(C.abs(), zf), C.shape[2]
    a = 2 * S + 16 + 4 * za
    rs = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = compressor_pool_naive(C, Z, ape, w, eps, overlap, pC, pZ)
    assert torch.allclose(y, x * rs * w, rtol=1e-12, atol=0), "fp64 twin vs the pooled x"
    rel_dx = (a * U32 * s).norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    bound = w.abs() * rs * (a * U32 * s + x.abs() * ((c / 2 + 8) * U32 + rel_dx))
    if cos is not None and cos.shape[-1]:
        r, m = 2 * cos.shape[-1], C.shape[2]
        pos = (torch.arange(C.shape[1], device=C.device) + first_block) * m
        ca, sa = cos[pos].double().abs(), sin[pos].double().abs()        # (n, r/2)
        y0, y1, b0, b1 = y[..., c - r::2], y[..., c - r + 1::2], bound[..., c - r::2], bound[..., c - r + 1::2]
        rnd = 3 * U32 * (y0.abs() + y1.abs())
        brot = torch.stack((ca * b0 + sa * b1 + rnd, sa * b0 + ca * b1 + rnd), -1).flatten(-2)
        bound = torch.cat((bound[..., :c - r], brot), -1)
        y = compressor_pool_naive(C, Z, ape, w, eps, overlap, pC, pZ, cos, sin, first_block)
    return y, bound


def _bound_ok(name, out, ref, bound):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    r = ((out.double() - ref).abs() / bound.clamp_min(1e-300)).max().item()
    assert r <= 1.0, f"{name}: error / bound = {r:.3f}"
    return r


def case_compressor_pool(device="cpu", big=False, dtype=torch.float32):
    """kernels/compressor_pool: the fused Triton pool + ape + RMSNorm_w (+ RoPE) against the fp64 naive twin, element
    by element within the error model of `_pool_ref_bound`; the fp32 naive twin within the same bound. Overlapping
    (CSA, m = 4, 2c channels) and plain (HCA-like m = 8; m = 128 on the GPU), prev given (strided slices of a
    decode-cache-like state) and None, ape in the kernel and pre-added (both within the bound: separately autotuned
    specialisations), n = 1, odd n, c = 20 / 48 / 64 / 128 (padded channel lanes), m = 3 (padded slots) and chunked
    slot loops (mb < m: the online-softmax rescale), one slot scoring +100 (overflows without the max subtracted).
    Every shape again with RoPE in the kernel (r = c, or r < c with the nope channels untouched; first_block 0, 1, 3;
    random-angle tables ending at the last position, fp32 and once bf16), the rope-less call unchanged by it (exactly,
    under the interpreter's one config), positions past the tables refused. bf16 (GPU): the fp32 inputs rounded to
    bf16 first (the projections stay fp32). Then the model's Compressor with kernels="triton" against
    kernels="torch", forward (RoPE fused into the kernel) and step() across chunk boundaries, on dyadic weights /
    inputs that make the projections exact (so both paths pool identical C, Z), and the training path (gradients
    through CompressorPoolFn, one kernel call, against the torch module's; case_compressor_pool_bwd checks them
    against fp64)."""
    import dsv4_lab.kernels.compressor_pool.triton as cpt
    from dsv4_lab.kernels.compressor_pool import compressor_pool
    from dsv4_lab.kernels.compressor_pool.naive import compressor_pool_naive
    g = torch.Generator().manual_seed(21)
    # (B, n, m, c, overlap, prev, ape in kernel, mb)
    shapes = [(2, 5, 4, 48, True, False, True, None), (2, 5, 4, 64, True, True, True, None),
              (2, 1, 4, 128, True, True, False, None), (2, 1, 4, 64, True, False, True, None),
              (2, 3, 4, 64, False, False, True, None), (2, 3, 8, 48, False, False, True, 2),
              (1, 4, 3, 20, True, True, True, 2)] if not big else \
        [(1, 2048, 4, 128, True, False, True, None), (1, 2048, 4, 64, True, True, True, None),
         (2, 301, 4, 128, True, True, False, None), (1, 64, 128, 128, False, False, True, None),
         (3, 77, 8, 48, False, False, True, None), (1, 33, 4, 48, True, True, True, 2)]
    worst = 0.0
    cpu = torch.device(device).type == "cpu"
    for si, (B, n, m, c, overlap, has_prev, in_kernel, mb) in enumerate(shapes):
        kc = (2 if overlap else 1) * c

        def r(*shape, scale=1.0):
            t = torch.randn(*shape, generator=g) * scale
            return t.to(dtype).float().to(device)
        Cfull, Zfull = r(B, n * m + 3, kc), r(B, n * m + 3, kc, scale=2.0)
        C, Z = Cfull[:, :n * m].unflatten(1, (n, m)), Zfull[:, :n * m].unflatten(1, (n, m))   # strided like step
        Z[0, n // 2, 1] += 100.0                                         # one dominant slot
        ape, w = r(m, kc, scale=0.5), r(c)
        pC = pZ = None
        if has_prev:
            state_kv, state_sc = r(B, 2 * m, kc), r(B, 2 * m, kc, scale=2.0)
            pC, pZ = state_kv[:, :m, :c], state_sc[:, :m, :c]            # (B, m, c) views, row stride kc
        y_ref, bound = _pool_ref_bound(C, Z, ape, w, 1e-6, overlap, pC, pZ)
        tag = f"compressor_pool B{B} n{n} m{m} c{c} {'overlap' if overlap else 'plain'} prev={has_prev} mb={mb}"
        if in_kernel:
            y_t = cpt.compressor_pool_triton(C, Z, ape, w, 1e-6, overlap, pC, pZ, mb=mb)
        else:
            y_t = cpt.compressor_pool_triton(C, Z + ape, None, w, 1e-6, overlap, pC, pZ, mb=mb)
            y_t2 = cpt.compressor_pool_triton(C, Z, ape, w, 1e-6, overlap, pC, pZ, mb=mb)
            # two kernel specialisations (HAS_APE) autotune separately: their configs (num_warps) may sum the slots
            # and channels in another order, so they agree within the error model, not bit for bit
            _bound_ok(tag + " ape in the kernel", y_t2, y_ref, bound)
        assert y_t.dtype == torch.float32
        worst = max(worst, _bound_ok(tag, y_t, y_ref, bound))
        _bound_ok(tag + " naive fp32", compressor_pool_naive(C, Z, ape, w, 1e-6, overlap, pC, pZ), y_ref, bound)
        y_noape = compressor_pool_naive(C.double(), Z.double(), None, w.double(), 1e-6, overlap,
                                        *(t if t is None else t.double() for t in (pC, pZ)))
        assert ((y_noape - y_ref).abs() > bound).any(), f"{tag}: the bound cannot tell ape's absence"
        if overlap and not has_prev:                                     # prev rows scoring -inf == no prev
            junk = r(B, m, c)
            y_inf = cpt.compressor_pool_triton(C, Z, ape, w, 1e-6, overlap, junk,
                                               torch.full_like(junk, float("-inf")), mb=mb)
            _bound_ok(tag + " -inf prev scores", y_inf, y_ref, bound)      # HAS_PREV: another specialisation
            if cpu:                                                      # one config (the interpreter's): exact
                assert torch.equal(y_inf, y_t), f"{tag}: -inf prev scores differ from prev=None"
        with torch.no_grad():                                            # the dispatcher takes the kernel
            y_d = compressor_pool(C, Z, ape, w, 1e-6, overlap, pC, pZ, impl="triton")
        if mb is None and in_kernel:
            assert torch.equal(y_d, y_t), f"{tag}: dispatcher (no grad) != kernel"
        # RoPE in the kernel: r = c, or r < c (channels [0, c - r) not rotated); first_block 0 / 3 / 1; tables of
        # random angles whose last row is the last entry's position (first_block + n - 1) m
        rr, fb = (c if si % 2 else 2 * (c // 4)), (0, 3, 1)[si % 3]
        ang = torch.rand((fb + n - 1) * m + 1, rr // 2, generator=g, dtype=torch.float64) * 200 - 100
        cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
        rtag = f"{tag} rope r{rr} first_block{fb}"
        y_ref_r, bound_r = _pool_ref_bound(C, Z, ape, w, 1e-6, overlap, pC, pZ, cos, sin, fb)
        assert torch.equal(y_ref_r[..., :c - rr], y_ref[..., :c - rr]), f"{rtag}: fp64 twin rotated nope channels"
        y_r = cpt.compressor_pool_triton(C, Z, ape, w, 1e-6, overlap, pC, pZ, mb=mb, cos=cos, sin=sin, first_block=fb)
        worst = max(worst, _bound_ok(rtag, y_r, y_ref_r, bound_r))
        y_nr = compressor_pool_naive(C, Z, ape, w, 1e-6, overlap, pC, pZ, cos, sin, fb)
        _bound_ok(rtag + " naive fp32", y_nr, y_ref_r, bound_r)
        assert ((y_ref - y_ref_r).abs() > bound_r).any(), f"{rtag}: the bound cannot tell the rotation's absence"
        if cpu:     # one config (the interpreter's): the rope specialisation pools and norms exactly as the rope-less
            y_k = y_t if in_kernel else y_t2                             # the same call without tables
            assert torch.equal(y_r[..., :c - rr], y_k[..., :c - rr]), f"{rtag}: nope channels differ from no rope"
            y_0 = cpt.compressor_pool_triton(C, Z, ape, w, 1e-6, overlap, pC, pZ, mb=mb, cos=cos[:, :0],
                                             sin=sin[:, :0], first_block=fb)
            assert torch.equal(y_0, y_k), f"{rtag}: r = 0 tables changed the entries"
        with torch.no_grad():                                            # the dispatcher: kernel / twin with RoPE
            y_dr = compressor_pool(C, Z, ape, w, 1e-6, overlap, pC, pZ, impl="triton", cos=cos, sin=sin,
                                   first_block=fb)
            y_tr = compressor_pool(C, Z, ape, w, 1e-6, overlap, pC, pZ, impl="torch", cos=cos, sin=sin,
                                   first_block=fb)
        if mb is None:
            assert torch.equal(y_dr, y_r), f"{rtag}: dispatcher (no grad) != kernel"
        assert torch.equal(y_tr, y_nr), f"{rtag}: dispatcher (torch) != naive twin"
        if si == 0:                                                      # bf16 tables, read as they are
            cb, sb = cos.bfloat16(), sin.bfloat16()
            y_ref_b, bound_b = _pool_ref_bound(C, Z, ape, w, 1e-6, overlap, pC, pZ, cb, sb, fb)
            _bound_ok(rtag + " bf16 tables", cpt.compressor_pool_triton(C, Z, ape, w, 1e-6, overlap, pC, pZ, mb=mb,
                                                                        cos=cb, sin=sb, first_block=fb),
                      y_ref_b, bound_b)
        try:                                                             # a position past the tables' rows
            cpt.compressor_pool_triton(C, Z, ape, w, 1e-6, overlap, pC, pZ, cos=cos, sin=sin, first_block=fb + 1)
            raise AssertionError(f"{rtag}: positions past the tables accepted")
        except ValueError:
            pass
    # dispatcher: n = 0; a gradient needed -> CompressorPoolFn (gradients: case_compressor_pool_bwd)
    assert compressor_pool(torch.zeros(2, 0, 4, 16, device=device), torch.zeros(2, 0, 4, 16, device=device), None,
                           torch.ones(8, device=device), 1e-6, True, impl="triton").shape == (2, 0, 8)
    Cg = torch.randn(1, 3, 4, 32, generator=g).to(device).requires_grad_(True)
    yg = compressor_pool(Cg, torch.randn(1, 3, 4, 32, generator=g).to(device), None, torch.ones(16, device=device),
                         1e-6, True, impl="triton")
    yg.sum().backward()
    assert type(yg.grad_fn).__name__ == "CompressorPoolFnBackward" and Cg.grad is not None, "grad: CompressorPoolFn"
    if not big:
        _compressor_module_check(device, g)
    return worst



def case_compressor_pool_bwd(device="cpu", big=False, dtype=torch.float32):
    """kernels/compressor_pool backward (CompressorPoolFn): dC, dZ, d ape, d weight of the Triton path against the
    fp64 naive twin under autograd (inputs, tables and g widened to fp64), relative Frobenius error.

    Error model (the file's convention, tol 1e-5 fp32 on CPU, 2e-4 on the GPU, 4 tol for gradients): the forward's
    per-weight relative error (2S + 16 + 4 max|z|) u32 (`_pool_ref_bound`, max|z| ~ 10 here: ~4e-6; the backward
    recomputes each weight as e^(z - lse) from the saved lse, another ~|z| u32) times the norm's backward, two
    sums over c <= 128 channels (c u32 = 7.6e-6 worst case, sqrt(c) u32 typical) and RoPE's adjoint (a few u32); the
    +100 slot's weight (~1, its neighbours' e^-100) is exact to ~100 u32 and its dZ = p (C - x) g_x cancels, but that
    entry is one of many in the norm. bf16 (GPU): the fp32 inputs rounded to bf16 first, C and Z stay fp32.
    Shapes: overlapping and plain, c = 24 / 20 (padded channel lanes) and 32 / 64 / 128, m = 4, 3 (padded slots),
    16 and 128 with mb < m (several slot chunks), B = 2, n = 5 / 1 / 4 (the last block's b channels get 0, entry 0's
    b slots nothing), ape in the kernel and pre-added (None), RoPE r = c / r < c / none with first_block 0 - 3, prev
    rows given (no gradient; -inf scores = None). The gradient path's forward equals the no-grad forward (bitwise
    under the interpreter's one config); gradients of C only / weight only; the dispatcher takes CompressorPoolFn
    when a gradient is needed and the naive twin when prev needs one (the kernel refuses it); a channel whose slots all
    score -inf pools to 0 with zero gradients (the naive twin gives NaN there)."""
    import dsv4_lab.kernels.compressor_pool.triton as cpt
    from dsv4_lab.kernels.compressor_pool import compressor_pool
    from dsv4_lab.kernels.compressor_pool.naive import compressor_pool_naive
    g = torch.Generator().manual_seed(22)
    cpu = torch.device(device).type == "cpu"
    tol = 4 * (1e-5 if cpu else 2e-4)
    # (B, n, m, c, overlap, ape in kernel, r, first_block, mb, prev)
    shapes = [(2, 5, 4, 24, True, True, 12, 2, None, None), (2, 1, 4, 32, True, True, 32, 0, None, None),
              (2, 5, 4, 32, True, False, 0, 0, None, "rows"), (2, 4, 4, 24, True, True, 8, 1, None, "-inf"),
              (2, 5, 16, 24, False, True, 24, 1, 4, None), (2, 1, 16, 32, False, False, 0, 0, None, None),
              (2, 3, 4, 32, False, True, 16, 3, None, None), (1, 4, 3, 20, True, True, 8, 3, 2, None)] if not big \
        else [(2, 512, 4, 128, True, True, 64, 0, None, None), (2, 512, 4, 64, True, True, 64, 1, None, None),
              (2, 64, 128, 128, False, True, 64, 0, None, None), (2, 301, 4, 48, True, False, 0, 0, None, "rows"),
              (1, 33, 4, 48, True, True, 16, 3, 2, None), (2, 33, 128, 24, False, True, 8, 2, 16, None)]
    worst = 0.0
    for (B, n, m, c, overlap, in_kernel, rr, fb, mb, prev) in shapes:
        kc = (2 if overlap else 1) * c

        def r(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).float().to(device)
        C, Z, ape, w = r(B, n, m, kc), r(B, n, m, kc, scale=2.0), r(m, kc, scale=0.5), r(c)
        Z[0, n // 2, 1] += 100.0                                         # one dominant slot
        pC = pZ = None
        if prev is not None:
            state_kv, state_sc = r(B, 2 * m, kc), r(B, 2 * m, kc, scale=2.0)
            pC, pZ = state_kv[:, :m, :c], state_sc[:, :m, :c]            # (B, m, c) views, row stride kc
            if prev == "-inf":
                pZ = torch.full_like(pZ, float("-inf"))
        cos = sin = None
        if rr:
            ang = torch.rand((fb + n - 1) * m + 1, rr // 2, generator=g, dtype=torch.float64) * 200 - 100
            cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
        go = r(B, n, c)
        if not in_kernel:                                                # Z includes ape: no ape input
            Z, ape = Z + ape, None
        ins = [C, Z, ape, w]
        tag = (f"compressor_pool bwd B{B} n{n} m{m} c{c} {'overlap' if overlap else 'plain'} ape={in_kernel} r{rr} "
               f"first_block{fb} mb={mb} prev={prev}")
        leaf = [None if t is None else t.clone().requires_grad_(True) for t in ins]
        y_t = cpt.compressor_pool_triton(*leaf, 1e-6, overlap, pC, pZ, mb=mb, cos=cos, sin=sin, first_block=fb)
        assert type(y_t.grad_fn).__name__ == "CompressorPoolFnBackward", f"{tag}: no CompressorPoolFn node"
        gr_t = torch.autograd.grad(y_t, [t for t in leaf if t is not None], go)
        ref = [None if t is None else t.double().requires_grad_(True) for t in ins]
        dbl = [None if t is None else t.double() for t in (pC, pZ, cos, sin)]
        y_r = compressor_pool_naive(*ref, 1e-6, overlap, *dbl, first_block=fb)
        gr_r = torch.autograd.grad(y_r, [t for t in ref if t is not None], go.double())
        _check(tag + " fwd", y_t, y_r, tol=tol / 4)
        with torch.no_grad():
            y_ng = cpt.compressor_pool_triton(*ins, 1e-6, overlap, pC, pZ, mb=mb, cos=cos, sin=sin, first_block=fb)
        if cpu:                                                          # one config: SAVE stores, out unchanged
            assert torch.equal(y_t.detach(), y_ng), f"{tag}: the gradient path's forward != the no-grad forward"
        names = [nm for nm, t in zip(["dC", "dZ", "d_ape", "d_weight"], ins) if t is not None]
        for nm, a, b in zip(names, gr_t, gr_r):
            assert a.dtype == torch.float32 and a.shape == b.shape, f"{tag} {nm}: {a.dtype} {tuple(a.shape)}"
            worst = max(worst, _check(f"{tag} {nm}", a, b, tol=tol))
        if overlap:                                                      # the last block's b channels feed nothing
            assert (gr_t[0][:, -1, :, :c] == 0).all() and (gr_t[1][:, -1, :, :c] == 0).all(), f"{tag}: last b"
        if prev == "-inf":                                               # -inf prev scores == no prev
            leaf2 = [None if t is None else t.clone().requires_grad_(True) for t in ins]
            y2 = cpt.compressor_pool_triton(*leaf2, 1e-6, overlap, mb=mb, cos=cos, sin=sin, first_block=fb)
            for nm, a, b in zip(names, torch.autograd.grad(y2, [t for t in leaf2 if t is not None], go), gr_t):
                _check(f"{tag} {nm} prev=None vs -inf", a, b, tol=tol)
    # gradients of one input at a time: C only (ape, weight plain tensors), weight only (C, Z no grad)
    B, n, m, c = 2, 3, 4, 24
    C, Z, ape, w, go = (torch.randn(*s, generator=g).to(device) for s in ((B, n, m, 2 * c), (B, n, m, 2 * c),
                                                                          (m, 2 * c), (c,), (B, n, c)))
    for which in (0, 3):
        leaf = [t.clone().requires_grad_(k == which) for k, t in enumerate((C, Z, ape, w))]
        ref = [t.double().requires_grad_(k == which) for k, t in enumerate((C, Z, ape, w))]
        (a,) = torch.autograd.grad(cpt.compressor_pool_triton(*leaf, 1e-6, True), [leaf[which]], go)
        (b,) = torch.autograd.grad(compressor_pool_naive(*ref, 1e-6, True), [ref[which]], go.double())
        _check(f"compressor_pool bwd only input {which}", a, b, tol=tol)
    # the dispatcher: a gradient needed -> CompressorPoolFn; prev needing one -> the naive twin (the kernel refuses)
    Cg = C.clone().requires_grad_(True)
    y = compressor_pool(Cg, Z, ape, w, 1e-6, True, impl="triton")
    assert type(y.grad_fn).__name__ == "CompressorPoolFnBackward", "dispatcher: training must take CompressorPoolFn"
    pCg, pZ = torch.randn(B, m, c, generator=g).to(device).requires_grad_(True), torch.randn(B, m, c).to(device)
    y = compressor_pool(Cg, Z, ape, w, 1e-6, True, pCg, pZ, impl="triton")
    assert "CompressorPoolFn" not in type(y.grad_fn).__name__, "prev needs a gradient: the naive twin must run"
    try:
        cpt.compressor_pool_triton(Cg, Z, ape, w, 1e-6, True, pCg, pZ)
        raise AssertionError("compressor_pool_triton accepted a prev_C that requires grad")
    except ValueError:
        pass
    # a channel whose slots all score -inf (plain, entry (0, 1), channel 3): pooled to 0, zero gradients there
    Zi = Z[..., :c].clone()
    Zi[0, 1, :, 3] = float("-inf")
    leaf = [C[..., :c].clone().requires_grad_(True), Zi.requires_grad_(True)]
    y = cpt.compressor_pool_triton(leaf[0], leaf[1], ape[:, :c], w, 1e-6, False)
    dC, dZ = torch.autograd.grad(y, leaf, go)
    assert torch.isfinite(y).all() and torch.isfinite(dC).all() and torch.isfinite(dZ).all(), "-inf channel: non-finite"
    assert (dC[0, 1, :, 3] == 0).all() and (dZ[0, 1, :, 3] == 0).all(), "-inf channel: non-zero gradient"
    return worst

def _compressor_module_check(device, g):
    """Compressor(kernels="triton") == Compressor(kernels="torch") within the pool's error model with RoPE (a
    RotaryTable, r < c), forward and step() over several chunkings (the kernel must be called: forward is one kernel
    call, RoPE inside it; step's entries are rotated by `rotate`); forward with a rope that is no RotaryTable (here
    the identity) takes the kernel for the pool and rotates outside it; training (backward) takes CompressorPoolFn
    and its parameter gradients equal the torch module's within 4e-5 relative (fp32 against fp32: both ~1e-6 from
    fp64, the projection GEMMs' backward adds sums of B T = 54 terms)."""
    import dsv4_lab.kernels.compressor_pool.triton as cpt
    from dsv4_lab.attention.compressor import Compressor
    from dsv4_lab.inference.cache import CompressorState
    from dsv4_lab.rope import RotaryTable
    calls = [0]
    orig = cpt.compressor_pool_triton

    def counted(*a, **k):
        calls[0] += 1
        return orig(*a, **k)
    cpt.compressor_pool_triton = counted
    try:
        ident = lambda x, pos: x                                         # noqa: E731

        def dy(*shape, k=8, sc=16):                                      # dyadic: multiples of 1 / sc in [-k/sc, k/sc]
            return torch.randint(-k, k + 1, shape, generator=g).float().div(sc).to(device)
        d, T = 16, 27
        for (c, m, overlap) in [(48, 4, True), (24, 8, False)]:
            mods = {impl: Compressor(d, c, m, overlap, impl=impl).to(device) for impl in ("torch", "triton")}
            # dyadic weights (multiples of 1/16) and inputs (of 1/8): each projection is a sum of 16 multiples of
            # 1/128 below 8 in magnitude, exact in fp32 in any order and chunking, and so is Z + ape (ape: of 1/4)
            ref = mods["torch"]
            sd = {"wkv.weight": dy(*ref.wkv.weight.shape), "wgate.weight": dy(*ref.wgate.weight.shape),
                  "ape": dy(*ref.ape.shape, sc=4), "norm.weight": torch.randn(c, generator=g).to(device)}
            for mod in mods.values():
                mod.load_state_dict(sd)
            u = dy(2, T, d, sc=8)
            n = T // m
            rope = RotaryTable(c // 3 if overlap else c // 2, T, 10.0).to(device)   # r = 16 / 12 < c, fast angles
            C, Z = mods["torch"].project(u[:, :n * m])
            args = (C.unflatten(1, (n, m)), Z.unflatten(1, (n, m)), sd["ape"], sd["norm.weight"],
                    mods["torch"].norm.eps, overlap)
            y_ref0, bound0 = _pool_ref_bound(*args)
            y_ref, bound = _pool_ref_bound(*args, cos=rope.cos, sin=rope.sin)
            for impl, mod in mods.items():
                before = calls[0]
                with torch.no_grad():
                    _bound_ok(f"Compressor {impl} forward c{c} m{m}", mod(u, rope), y_ref, bound)
                    assert calls[0] - before == (impl == "triton"), f"{impl} forward: kernel calls {calls[0] - before}"
                    _bound_ok(f"Compressor {impl} forward c{c} m{m} identity rope", mod(u, ident), y_ref0, bound0)
                    for chunks in ([T], [5, 3, 1, 7, 2, 9], [1] * 9 + [18]):
                        st = CompressorState(2, m, (2 if overlap else 1) * c, overlap, device=device)
                        outs, p0 = [], 0
                        for L in chunks:
                            e, first = mod.step(u[:, p0:p0 + L], st, p0)
                            assert first == p0 // m and e.shape[1] == (p0 % m + L) // m
                            outs.append(mod.rotate(e, rope, first))
                            p0 += L
                        _bound_ok(f"Compressor {impl} step {chunks} c{c} m{m}", torch.cat(outs, 1), y_ref, bound)
                assert (calls[0] > before) == (impl == "triton"), f"{impl}: kernel calls {calls[0] - before}"
            before = calls[0]                                            # training: CompressorPoolFn, one call
            go = torch.randn(2, n, c, generator=g).to(device)
            grads = {}
            for impl, mod in mods.items():
                (mod(u, rope) * go).sum().backward()
                grads[impl] = [p.grad for p in (mod.wkv.weight, mod.wgate.weight, mod.ape, mod.norm.weight)]
            assert calls[0] - before == 1, f"training: kernel calls {calls[0] - before}"
            for nm, a, b in zip(["wkv", "wgate", "ape", "norm.weight"], grads["triton"], grads["torch"]):
                _check(f"Compressor training d {nm} c{c} m{m}", a, b, tol=4e-5 if device == "cpu" else 8e-4)
    finally:
        cpt.compressor_pool_triton = orig


CASES = {"sparse_attn": case_sparse_attn, "hca_attn": case_hca_attn, "indexer_topk": case_indexer_topk,
         "indexer_methods": case_indexer_methods, "indexer_select": case_indexer_select,
         "indexer_mxfp4": case_indexer_mxfp4,
         "fake_quant": case_fake_quant, "mhc": case_mhc,
         "sparse_decode": case_sparse_decode, "hca_decode": case_hca_decode, "sparse_kl": case_sparse_kl,
         "compressor_pool": case_compressor_pool, "compressor_pool_bwd": case_compressor_pool_bwd,
         "swiglu": case_swiglu, "rope": case_rope, "rmsnorm": case_rmsnorm}


def run_all(device="cpu", big=False, dtypes=(torch.float32,), only=None, compile_check=None):
    """Every case (or those in `only`) per dtype -> {case[dtype]: {ok, seconds, error}}. compile_check: the
    dsv4_lab.kernels.compile_check module when installed (each record then counts the kernel specializations the case
    lowered for the GPU)."""
    res = {}
    for name, fn in CASES.items():
        if only and name not in only:
            continue
        for dt in dtypes:
            key = f"{name}[{str(dt).replace('torch.', '')}]"
            t0 = time.time()
            n0 = len(compile_check.compiled()) if compile_check else 0
            try:
                fn(device, big, dt)
                res[key] = {"ok": True, "seconds": round(time.time() - t0, 2)}
                if compile_check:                                    # what the case lowered for sm_90 as well
                    res[key]["compiled_for_gpu"] = len(compile_check.compiled()) - n0
            except Exception:
                res[key] = {"ok": False, "seconds": round(time.time() - t0, 2), "error": traceback.format_exc()}
    return res


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--list", action="store_true", help="print the case names, one per line, and exit")
    a = ap.parse_args()
    if a.list:
        print("\n".join(CASES))
        sys.exit(0)
    for name in a.only or ():
        if name not in CASES:
            print(f"kernels_cases: --only {name!r} is no case; allowed: {', '.join(CASES)}", file=sys.stderr)
            sys.exit(2)
    if not a.json:
        print("kernels_cases: --json FILE is required (or --list)", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before importing triton)"
    from dsv4_lab.kernels import compile_check             # every interpreted launch also lowered for sm_90
    compile_check.install()                                # (as under DSV4_GPU_COMPILE_CHECK=1)
    out = run_all("cpu", False, (torch.float32,), a.only, compile_check)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
