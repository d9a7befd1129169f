"""CSA core attention, flash-decoding (split-KV) forward for few queries (decode; docs/kernels.md §2.2, §8.4; T6).

Same semantics as naive.py / triton.py (docs §2.5): query t = q_offset + i attends, in one softmax whose denominator
also holds exp(sink_h), to the window rows kv[t - W + 1 .. t] and the picks comp[idx[i, k]] (-1 / out of range
masked, a repeated index counted once per occurrence).

Why a second kernel: triton.py runs ONE program per (query, batch) that walks all W + K entries; at decode
(B * T small) that is a handful of programs on 132 SMs, each bound by the latency of W + K entries in sequence.
Here the entries of each query are cut into NS splits (grid (B * T, NS)):
    split sp <  NSK : picks   [sp * CHUNK, (sp + 1) * CHUNK) ∩ [0, K)
    split sp >= NSK : window  rows offsets [(sp - NSK) * CHUNK, ...) ∩ [0, W)
Each split runs an online softmax (exp2 domain) with all H heads of the query as the rows of every tl.dot (padded to
BLOCK_H >= 16, masked) and writes its partial (m, l, acc) in fp32 (acc unnormalised, relative to its own m).
`_combine` (shared with hca_attn/triton_decode.py) merges the NS partials of each (query, head) row together with
the sink (which enters the denominator only) and writes o and the exact lse (natural log; -inf when nothing is
visible and there is no sink), so a backward pass could use it exactly like triton.py's lse.

Split count: CHUNK = BLOCK_N * blocks-per-split, picked so that (B * T) * NS ~ 4 x SMs programs (capped by the
number of entry blocks: at B = 1 one block per program), CHUNK and NS are runtime arguments (no recompile when the
context grows: the kernels also do not specialise on the lengths' divisibility by 16, which would otherwise recompile
them every few decode steps); only the power-of-two bucket of NS is a compile-time constant of `_combine`.

PDL (pdl=True; PDL for the default; sm_90+): both launches with programmatic dependent launch (_common.py): their
programs start while the launch before them still runs and wait for its writes before they load anything (the split
launch's picks come from the select launch before it).
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, dep_wait, dot_dtype, jit, next_pow2, sm_count, tl, triton, use_pdl

LOG2E = 1.4426950408889634
MAX_SPLITS = 256                      # bound on NS (the combine holds NS_P m's per row in registers)
PDL = False                           # sparse_attn_decode_fwd's default `pdl` (off until timed on the H200)


def num_sms(device) -> int:
    """Streaming multiprocessors of `device` (132 on the H200); 8 under the interpreter (tiny test shapes)."""
    return 8 if device.type != "cuda" else sm_count(device)


def plan_splits(n_blocks: int, groups: int, sms: int, num_splits: int | None = None) -> int:
    """Blocks per split so that groups * NS ~ 4 * sms programs (or ~num_splits splits if given), NS <= MAX_SPLITS."""
    want = num_splits if num_splits is not None else triton.cdiv(4 * sms, max(groups, 1))
    ns = max(1, min(n_blocks, want, MAX_SPLITS))
    bps = triton.cdiv(max(n_blocks, 1), ns)
    while triton.cdiv(max(n_blocks, 1), bps) > MAX_SPLITS - 2:   # room for the extra window split(s)
        bps += 1
    return bps


@jit
def _online_block(qd, ed, valid, m_i, l_i, acc, DOT_DT: tl.constexpr):
    """One block of entries (BLOCK_N, BLOCK_D) into the running (m, l, acc); valid (BLOCK_M, BLOCK_N) bool."""
    sc = tl.dot(qd, tl.trans(ed))
    sc = tl.where(valid, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), ed)
    return m_new, l_i, acc


@jit
def _store_partial(PM, PL, PACC, g, sp, NS, m_i, l_i, acc, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials laid out (G, NS, BLOCK_M) and (G, NS, BLOCK_M, BLOCK_D), fp32, contiguous."""
    r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row = (g.to(tl.int64) * NS + sp) * BLOCK_M + r                        # (BLOCK_M,) int64
    rm = r < BLOCK_M
    tl.store(PM + row, m_i, mask=rm)
    tl.store(PL + row, l_i, mask=rm)
    tl.store(PACC + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=rm[:, None] & (offs_d[None, :] < BLOCK_D))


@jit(do_not_specialize=["T", "NQB", "NS"])                 # no recompiles as the context grows
def _combine(PM, PL, PACC, SINK, O, LSE,
             T, NQB, NS,
             sob, sot, soh, slb, slt,
             H: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NS_P: tl.constexpr, SB: tl.constexpr,
             HAS_SINK: tl.constexpr, PDL: tl.constexpr):
    """grid (G, BLOCK_M): merge the NS partials of row r of group g = b * NQB + qb (query tq = qb * BT + r // HP,
    head h = r % HP) with the sink; writes o (q's dtype) and lse (natural log). PDL: wait for the split launch's
    writes first (programmatic dependent launch)."""
    if PDL:
        dep_wait()
    g = tl.program_id(0)
    r = tl.program_id(1)
    b = (g // NQB).to(tl.int64)
    tq = (g % NQB) * BT + r // HP
    h = r % HP
    ok = (tq < T) & (h < H)
    offs_s = tl.arange(0, NS_P)
    base = g.to(tl.int64) * NS * BLOCK_M + r
    m = tl.load(PM + base + offs_s.to(tl.int64) * BLOCK_M, mask=offs_s < NS, other=float("-inf"))
    l = tl.load(PL + base + offs_s.to(tl.int64) * BLOCK_M, mask=offs_s < NS, other=0.0)
    mx = tl.max(m, 0)
    if HAS_SINK:
        sk = tl.load(SINK + h, mask=h < H, other=0.0).to(tl.float32) * 1.4426950408889634
        sk = tl.minimum(sk, 1e30)
        mx = tl.maximum(mx, sk)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    l_tot = tl.sum(l * tl.exp2(m - mx_safe), 0)
    if HAS_SINK:
        l_tot += tl.exp2(sk - mx_safe)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, NS, SB):
        ss = s0 + tl.arange(0, SB)
        smask = ss < NS
        ms = tl.load(PM + base + ss.to(tl.int64) * BLOCK_M, mask=smask, other=float("-inf"))
        w = tl.exp2(ms - mx_safe)                                          # 0 for empty splits (m = -inf)
        a = tl.load(PACC + (base + ss.to(tl.int64)[:, None] * BLOCK_M) * BLOCK_D + offs_d[None, :],
                    mask=smask[:, None], other=0.0)
        acc += tl.sum(a * w[:, None], 0)
    l_safe = tl.where(l_tot == 0.0, 1.0, l_tot)
    o = acc / l_safe
    lse = tl.where(l_tot == 0.0, float("-inf"), (mx_safe + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * sob + tq.to(tl.int64) * sot + h * soh + offs_d, o.to(O.dtype.element_ty),
             mask=ok & (offs_d < D))
    tl.store(LSE + b * slb + tq * slt + h, lse, mask=ok)


def combine(pm, pl, pacc, sink, o, lse, T, NQB, NS, H, HP, BT, D, BLOCK_M, BLOCK_D, pdl: bool = False):
    """The combine launch; pdl: with programmatic dependent launch (the caller has checked pdl_supported)."""
    G = pm.shape[0]
    sink_t = sink.float().contiguous() if sink is not None else lse
    _combine[(G, BLOCK_M)](pm, pl, pacc, sink_t, o, lse, T, NQB, NS,
                           o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                           H=H, HP=HP, BT=BT, D=D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, NS_P=max(16, next_pow2(NS)),
                           SB=16 if INTERPRET else 32, HAS_SINK=sink is not None, PDL=pdl, num_warps=4, num_stages=2,
                           launch_pdl=pdl)


@jit(do_not_specialize=["T", "Tk", "S", "q_offset", "CHUNK", "NSK", "NS"])
def _sparse_split(Q, KV, C, IDX, PM, PL, PACC,
                  T, Tk, S, K_SEL, W, q_offset, qk_scale, CHUNK, NSK, NS,
                  sqb, sqt, sqh, skb, skt, scb, scs, sib, sit,
                  H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_DT: tl.constexpr, PDL: tl.constexpr):
    if PDL:                                  # programmatic dependent launch: the launch before's writes first
        dep_wait()
    g = tl.program_id(0)                                                   # g = b * T + t
    sp = tl.program_id(1)
    b = (g // T).to(tl.int64)
    t = g % T
    pos = q_offset + t
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + t.to(tl.int64) * sqt + offs_h[:, None] * sqh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    qd = (q * qk_scale).to(DOT_DT)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # --- picks [sp * CHUNK, ...) (empty when sp >= NSK) ---
    k_lo = sp * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K_SEL)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        sidx = tl.load(IDX + b * sib + t.to(tl.int64) * sit + offs_k, mask=offs_k < k_hi, other=-1)
        valid = (sidx >= 0) & (sidx < S)
        e = tl.load(C + b * scb + sidx.to(tl.int64)[:, None] * scs + offs_d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        m_i, l_i, acc = _online_block(qd, e.to(DOT_DT), valid[None, :], m_i, l_i, acc, DOT_DT)
    # --- window rows pos - W + 1 + [lo, hi) (empty when sp < NSK) ---
    wi = sp - NSK
    w_lo = tl.maximum(wi, 0) * CHUNK
    w_hi = tl.minimum((wi + 1) * CHUNK, W)
    for jb in range(w_lo, w_hi, BLOCK_N):
        offs_j = jb + tl.arange(0, BLOCK_N)
        j = pos - W + 1 + offs_j
        valid = (j >= 0) & (j < Tk) & (offs_j < w_hi)
        e = tl.load(KV + b * skb + j.to(tl.int64)[:, None] * skt + offs_d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        m_i, l_i, acc = _online_block(qd, e.to(DOT_DT), valid[None, :], m_i, l_i, acc, DOT_DT)
    _store_partial(PM, PL, PACC, g, sp, NS, m_i, l_i, acc, BLOCK_H, BLOCK_D)


def sparse_attn_decode_fwd(q, kv, comp, idx, sink, scale: float, window: int, q_offset: int = 0,
                           num_splits: int | None = None, block_n: int | None = None, pdl: bool | None = None):
    """Split-KV forward; returns (o (B, T, H, D) in q's dtype, lse (B, T, H) fp32). `num_splits` / `block_n`
    override the heuristic (tests); pdl: both launches with programmatic dependent launch (None: PDL; where
    _common.pdl_supported)."""
    check_device(q, kv, comp, idx, sink)
    B, T, H, D = q.shape
    assert kv.dim() == 3 and comp.dim() == 3 and idx.dim() == 3, "kv (B, Tk, D), comp (B, S, D), idx (B, T, K)"
    assert kv.shape[0] == B and comp.shape[0] == B and idx.shape[:2] == (B, T), "batch / length mismatch"
    assert kv.shape[2] == D and comp.shape[2] == D, f"entry dim must be D = {D}"
    q = q.contiguous() if q.stride(-1) != 1 else q
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()      # row strides are kernel arguments: a batched cache
    comp = comp if comp.stride(-1) == 1 else comp.contiguous()    # slice (B, :N) is used in place, not copied
    idx = idx.to(torch.int32).contiguous()
    Tk, S, K = kv.shape[1], comp.shape[1], idx.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    if T == 0 or B == 0:
        return o, lse
    BH, BD = max(16, next_pow2(H)), max(16, next_pow2(D))
    BN = block_n or (16 if INTERPRET else 32)
    W = max(int(window), 0)
    n_blocks = triton.cdiv(K, BN) + triton.cdiv(W, BN)
    CHUNK = BN * plan_splits(n_blocks, B * T, num_sms(q.device), num_splits)
    NSK, NSW = triton.cdiv(K, CHUNK), triton.cdiv(W, CHUNK)
    NS = max(1, NSK + NSW)
    G = B * T
    pm = torch.empty(G, NS, BH, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(G, NS, BH, BD, device=q.device, dtype=torch.float32)
    on = use_pdl(pdl, PDL, q.device)
    _sparse_split[(G, NS)](q, kv, comp, idx, pm, pl, pacc,
                           T, Tk, S, K, W, q_offset, scale * LOG2E, CHUNK, NSK, NS,
                           q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), comp.stride(0),
                           comp.stride(1), idx.stride(0), idx.stride(1),
                           H=H, D=D, BLOCK_H=BH, BLOCK_D=BD, BLOCK_N=BN, DOT_DT=dot_dtype(q), PDL=on,
                           num_warps=4, num_stages=2, launch_pdl=on)
    combine(pm, pl, pacc, sink, o, lse, T, T, NS, H, BH, 1, D, BH, BD, pdl=on)
    return o, lse


DECODE_MAX_QUERIES = 64   # B * T at or below which hca_attn_fwd / sparse_attn_fwd take the split path ...
DECODE_MAX_T = 16         # ... or T (queries per sequence: decode, MTP / speculative verification) at or below this


def use_decode_path(q, *entries) -> bool:
    """Dispatch rule of sparse_attn_fwd / hca_attn_fwd: few queries and no activation that requires grad.
    Few queries = B * T <= 64 (triton.py's grid has then <= 64 programs on 132 SMs, each walking all its entries in
    sequence: 1 program for 8192 entries at 1M, B = 1) or T <= 16 at any batch (decode: with B * T >= 4 x SMs the
    planner gives 1 split per query, i.e. triton.py's grid plus a combine pass over 8 KB of partials per query,
    while at B of 64-256 the query-major HCA grid is still B programs of N / 128 entries each).
    Training keeps the tuned query-major kernels (q / kv / comp require grad); the sink is a Parameter that requires
    grad even under no_grad, so it is not looked at. The split path's lse is exact, so a backward would be correct."""
    B, T = q.shape[0], q.shape[1]
    if B * T == 0 or (B * T > DECODE_MAX_QUERIES and T > DECODE_MAX_T):
        return False
    return not (q.requires_grad or any(e is not None and e.requires_grad for e in entries))
