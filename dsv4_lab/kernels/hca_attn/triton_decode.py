"""HCA core attention, flash-decoding (split-KV) forward for few queries (decode; docs/kernels.md §2.3, §8.4; T7).

Same semantics as naive.py / triton.py (docs §3): query t = q_offset + i attends, in one softmax whose denominator
also holds exp(sink_h), to the window rows kv[t - W + 1 .. t] and to every compressed entry s < floor((t + 1) / m').

Why a second kernel: triton.py gives one program BT consecutive queries x all heads and walks every visible
compressed entry (8192 at 1M context) plus the window in sequence; at decode that is 1 program per batch element on
132 SMs (measured 189 us at 1M, B = 1). Here a program owns (batch, block of BT queries, split) — grid
(B * NQB, NS) — and the same BT x HP rows (all heads of BT queries, >= 16 rows, masked) as triton.py:
    split sp <  NSC : compressed entries [sp * CHUNK, (sp + 1) * CHUNK) ∩ [0, nvis(block))   (row-wise s < (t+1)//m')
    split sp >= NSC : window band offsets [(sp - NSC) * CHUNK, ...) ∩ [0, W + BT - 1) of rows t0 - W + 1 .. t_last
Each split writes a partial (m, l, acc) in fp32; sparse_attn/triton_decode.py's `_combine` merges the NS partials of
each (query, head) row with the sink (denominator only) into o and the exact lse (natural log).

Split count: CHUNK = BLOCK_N * blocks-per-split with (B * NQB) * NS ~ 4 x SMs programs, capped by the number of
entry blocks (at 1M, B = 1: 128 compressed splits of 64 entries + 2 window splits). CHUNK / NS / NSC are runtime
arguments, so a growing context does not recompile the split kernel (`_combine` recompiles per power-of-two of NS).
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, dot_dtype, jit, next_pow2, tl, triton
from ..sparse_attn.triton_decode import _online_block, _store_partial, combine, num_sms, plan_splits, use_decode_path

LOG2E = 1.4426950408889634


@jit(do_not_specialize=["T", "Tk", "S", "WB", "q_offset", "kv_start", "CHUNK", "NSC", "NS", "NQB"])
def _hca_split(Q, KV, C, PM, PL, PACC,                                     # runtime lengths: a growing context
               T, Tk, S, W, WB, q_offset, kv_start, qk_scale, CHUNK, NSC, NS, NQB,
               sqb, sqt, sqh, skb, skt, scb, scs,
               H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, RATIO: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DT: tl.constexpr):
    BT: tl.constexpr = BLOCK_M // HP
    g = tl.program_id(0)                                                   # g = b * NQB + qb
    sp = tl.program_id(1)
    b = (g // NQB).to(tl.int64)
    t0 = (g % NQB) * BT
    r = tl.arange(0, BLOCK_M)
    tq = t0 + r // HP
    h = r % HP
    rmask = (tq < T) & (h < H)
    pos = q_offset + tq
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + tq.to(tl.int64)[:, None] * sqt + h[:, None] * sqh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    qd = (q * qk_scale).to(DOT_DT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # --- compressed entries of this split (empty when sp >= NSC or beyond the block's visible count) ---
    nvis_row = (pos + 1) // RATIO                                          # (BLOCK_M,) block-causal
    t_last = tl.minimum(t0 + BT, T) - 1
    nvis = tl.minimum((q_offset + t_last + 1) // RATIO, S)
    s_lo = sp * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, nvis)
    for s0 in range(s_lo, s_hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        smask = s < s_hi
        e = tl.load(C + b * scb + s.to(tl.int64)[:, None] * scs + offs_d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        valid = (s[None, :] < nvis_row[:, None]) & smask[None, :]
        m_i, l_i, acc = _online_block(qd, e.to(DOT_DT), valid, m_i, l_i, acc, DOT_DT)
    # --- window band rows pos0 - W + 1 + [lo, hi), WB = W + BT - 1 (empty when sp < NSC) ---
    pos0 = q_offset + t0
    wi = sp - NSC
    w_lo = tl.maximum(wi, 0) * CHUNK
    w_hi = tl.minimum((wi + 1) * CHUNK, WB)
    for jb in range(w_lo, w_hi, BLOCK_N):
        offs_j = jb + tl.arange(0, BLOCK_N)
        j = pos0 - W + 1 + offs_j
        jmask = (j >= kv_start) & (j < kv_start + Tk) & (offs_j < w_hi)          # kv[i] holds kv_start + i
        e = tl.load(KV + b * skb + (j - kv_start).to(tl.int64)[:, None] * skt + offs_d[None, :],
                    mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        valid = jmask[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - W)
        m_i, l_i, acc = _online_block(qd, e.to(DOT_DT), valid, m_i, l_i, acc, DOT_DT)
    _store_partial(PM, PL, PACC, g, sp, NS, m_i, l_i, acc, BLOCK_M, BLOCK_D)


def hca_attn_decode_fwd(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0,
                        num_splits: int | None = None, block_n: int | None = None, kv_start: int = 0):
    """Split-KV forward; returns (o (B, T, H, D) in q's dtype, lse (B, T, H) fp32). `num_splits` / `block_n`
    override the heuristic (tests)."""
    check_device(q, kv, comp, sink)
    B, T, H, D = q.shape
    assert kv.dim() == 3 and comp.dim() == 3, "kv (B, Tk, D), comp (B, S, D)"
    assert kv.shape[0] == B and comp.shape[0] == B, "batch mismatch"
    assert kv.shape[2] == D and comp.shape[2] == D, f"entry dim must be D = {D}"
    if next_pow2(H) > 64:
        raise ValueError(f"hca_attn triton: n_heads = {H} is not allowed: at most 64")
    q = q.contiguous() if q.stride(-1) != 1 else q
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()      # row strides are kernel arguments: a batched cache
    comp = comp if comp.stride(-1) == 1 else comp.contiguous()    # slice (B, :N) is used in place, not copied
    Tk, S = kv.shape[1], comp.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    if T == 0 or B == 0:
        return o, lse
    HP, BD = next_pow2(H), max(16, next_pow2(D))
    BM = max(16, HP, min(64, HP * next_pow2(T)))             # BT = BM // HP queries per program (>= 16 rows)
    BT = BM // HP
    NQB = triton.cdiv(T, BT)
    BN = block_n or (16 if INTERPRET else 64)
    W = max(int(window), 0)
    WB = W + BT - 1 if W > 0 else 0
    nvis_max = min(S, (q_offset + T) // ratio)                             # visible to the last query
    n_blocks = triton.cdiv(nvis_max, BN) + triton.cdiv(WB, BN)
    CHUNK = BN * plan_splits(n_blocks, B * NQB, num_sms(q.device), num_splits)
    NSC, NSW = triton.cdiv(nvis_max, CHUNK), triton.cdiv(WB, CHUNK)
    NS = max(1, NSC + NSW)
    G = B * NQB
    pm = torch.empty(G, NS, BM, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(G, NS, BM, BD, device=q.device, dtype=torch.float32)
    _hca_split[(G, NS)](q, kv, comp, pm, pl, pacc,
                        T, Tk, S, W, WB, q_offset, kv_start, scale * LOG2E, CHUNK, NSC, NS, NQB,
                        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), comp.stride(0),
                        comp.stride(1),
                        H=H, HP=HP, D=D, RATIO=ratio, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN, DOT_DT=dot_dtype(q),
                        num_warps=4, num_stages=2)
    combine(pm, pl, pacc, sink, o, lse, T, NQB, NS, H, HP, BT, D, BM, BD)
    return o, lse


__all__ = ["hca_attn_decode_fwd", "use_decode_path"]
