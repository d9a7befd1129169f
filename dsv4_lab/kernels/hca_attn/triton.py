"""HCA core attention in Triton: forward and backward (same interface as naive.py).

Design (kernels.md §2.3): dense FlashAttention-style tiles. One program owns BT consecutive queries x all heads
(BLOCK_M = BT * HP rows, HP = next_pow2(H)), so the M dimension of every tl.dot is 64-128 rows even with one KV
head. It streams the compressed entries 0 .. floor((t_last + 1) / ratio) - 1 (row-wise block-causal mask
s < floor((t + 1) / ratio)), then the window rows t0 - W + 1 .. t_last (row-wise band mask), in one online
softmax whose initial state is the sink. The compressed KV is tiny (N / ratio rows) and stays in L2.

Backward: same tiling; recomputes p from the saved lse, writes dQ and adds the entries' gradients (K = V) with fp32
atomics (compressed and window entries are shared by many query tiles; non-deterministic summation order).
"""
from __future__ import annotations

import torch

from .._common import check_device, configs, dot_dtype, next_pow2, tl, triton

LOG2E = 1.4426950408889634


def _fwd_configs():
    # two configs only: each extra config costs a compile (seconds) per shape key on the GPU
    return configs([triton.Config({"BLOCK_M": 64, "BLOCK_S": 64}, num_warps=4, num_stages=2),
                    triton.Config({"BLOCK_M": 128, "BLOCK_S": 64}, num_warps=8, num_stages=2)],
                   triton.Config({"BLOCK_M": 64, "BLOCK_S": 16}, num_warps=4, num_stages=1))


@triton.jit
def _tile_rows(t0, T, q_offset, H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr):
    r = tl.arange(0, BLOCK_M)
    tq = t0 + r // HP
    h = r % HP
    rmask = (tq < T) & (h < H)
    return tq, h, rmask, q_offset + tq


@triton.autotune(configs=_fwd_configs(), key=["H", "D", "W", "RATIO"])
@triton.jit
def _hca_fwd(Q, KV, C, SINK, O, LSE,
             T, Tk, S, q_offset, qk_scale,
             sqb, sqt, sqh, skb, skt, scb, scs, sob, sot, soh, slb, slt,
             H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, RATIO: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
             HAS_SINK: tl.constexpr, DOT_DT: tl.constexpr):
    BT: tl.constexpr = BLOCK_M // HP
    t0 = tl.program_id(0) * BT
    b = tl.program_id(1).to(tl.int64)
    tq, h, rmask, pos = _tile_rows(t0, T, q_offset, H, HP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + tq.to(tl.int64)[:, None] * sqt + h[:, None] * sqh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    qd = (q * qk_scale).to(DOT_DT)
    if HAS_SINK:
        m_i = tl.load(SINK + h, mask=h < H, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.minimum(m_i, 1e30)
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # --- compressed entries, block-causal ---
    nvis_row = (pos + 1) // RATIO                                            # (BLOCK_M,)
    t_last = tl.minimum(t0 + BT, T) - 1
    nvis = tl.minimum((q_offset + t_last + 1) // RATIO, S)
    for s0 in range(0, nvis, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < nvis
        e = tl.load(C + b * scb + s.to(tl.int64)[:, None] * scs + offs_d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        ed = e.to(DOT_DT)
        sc = tl.dot(qd, tl.trans(ed))
        sc = tl.where((s[None, :] < nvis_row[:, None]) & smask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), ed)
        m_i = m_new
    # --- window band: rows pos0 - W + 1 .. pos_last ---
    pos0 = q_offset + t0
    for jb in range(0, W + BT - 1, BLOCK_J):
        j = pos0 - W + 1 + jb + tl.arange(0, BLOCK_J)
        jmask = (j >= 0) & (j < Tk) & (jb + tl.arange(0, BLOCK_J) < W + BT - 1)
        e = tl.load(KV + b * skb + j.to(tl.int64)[:, None] * skt + offs_d[None, :],
                    mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        ed = e.to(DOT_DT)
        sc = tl.dot(qd, tl.trans(ed))
        vis = jmask[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - W)
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), ed)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * sob + tq.to(tl.int64)[:, None] * sot + h[:, None] * soh + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + b * slb + tq * slt + h, lse, mask=rmask)


@triton.jit
def _hca_bwd(Q, KV, C, O, DO, LSE, DQ, DKV, DC, DELTA,
             T, Tk, S, q_offset, scale,
             sqb, sqt, sqh, skb, skt, scb, scs, sob, sot, soh, slb, slt,
             H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, RATIO: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
             DOT_DT: tl.constexpr):
    BT: tl.constexpr = BLOCK_M // HP
    t0 = tl.program_id(0) * BT
    b = tl.program_id(1).to(tl.int64)
    tq, h, rmask, pos = _tile_rows(t0, T, q_offset, H, HP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rd = rmask[:, None] & dmask[None, :]
    qo = b * sqb + tq.to(tl.int64)[:, None] * sqt + h[:, None] * sqh + offs_d[None, :]
    oo = b * sob + tq.to(tl.int64)[:, None] * sot + h[:, None] * soh + offs_d[None, :]
    q = tl.load(Q + qo, mask=rd, other=0.0).to(tl.float32)
    o = tl.load(O + oo, mask=rd, other=0.0).to(tl.float32)
    do = tl.load(DO + oo, mask=rd, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * slb + tq * slt + h, mask=rmask, other=0.0)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + b * slb + tq * slt + h, delta, mask=rmask)
    lse2 = lse * 1.4426950408889634
    qd = (q * (scale * 1.4426950408889634)).to(DOT_DT)
    dod = do.to(DOT_DT)
    q_dt = q.to(DOT_DT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    nvis_row = (pos + 1) // RATIO
    t_last = tl.minimum(t0 + BT, T) - 1
    nvis = tl.minimum((q_offset + t_last + 1) // RATIO, S)
    for s0 in range(0, nvis, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < nvis
        e = tl.load(C + b * scb + s.to(tl.int64)[:, None] * scs + offs_d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        ed = e.to(DOT_DT)
        sc = tl.dot(qd, tl.trans(ed))
        keep = rmask[:, None] & (s[None, :] < nvis_row[:, None]) & smask[None, :]
        p = tl.where(keep, tl.exp2(sc - lse2[:, None]), 0.0)
        dp = tl.dot(dod, tl.trans(ed))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT_DT), ed)
        de = tl.dot(tl.trans(p).to(DOT_DT), dod) + tl.dot(tl.trans(ds).to(DOT_DT), q_dt) * scale
        tl.atomic_add(DC + b * S * D + s.to(tl.int64)[:, None] * D + offs_d[None, :], de,
                      mask=smask[:, None] & dmask[None, :])
    pos0 = q_offset + t0
    for jb in range(0, W + BT - 1, BLOCK_J):
        j = pos0 - W + 1 + jb + tl.arange(0, BLOCK_J)
        jmask = (j >= 0) & (j < Tk) & (jb + tl.arange(0, BLOCK_J) < W + BT - 1)
        e = tl.load(KV + b * skb + j.to(tl.int64)[:, None] * skt + offs_d[None, :],
                    mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        ed = e.to(DOT_DT)
        sc = tl.dot(qd, tl.trans(ed))
        keep = rmask[:, None] & jmask[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - W)
        p = tl.where(keep, tl.exp2(sc - lse2[:, None]), 0.0)
        dp = tl.dot(dod, tl.trans(ed))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT_DT), ed)
        de = tl.dot(tl.trans(p).to(DOT_DT), dod) + tl.dot(tl.trans(ds).to(DOT_DT), q_dt) * scale
        tl.atomic_add(DKV + b * Tk * D + j.to(tl.int64)[:, None] * D + offs_d[None, :], de,
                      mask=jmask[:, None] & dmask[None, :])
    tl.store(DQ + qo, dq * scale, mask=rd)


def _prep(q, kv, comp):
    B, T, H, D = q.shape
    assert kv.dim() == 3 and comp.dim() == 3, "kv (B, Tk, D), comp (B, S, D)"
    assert kv.shape[0] == B and comp.shape[0] == B, "batch mismatch"
    assert kv.shape[2] == D and comp.shape[2] == D, f"entry dim must be D = {D}"
    if next_pow2(H) > 64:
        raise ValueError(f"hca_attn triton: n_heads = {H} is not allowed: at most 64")
    q = q.contiguous() if q.stride(-1) != 1 else q
    return q, kv.contiguous(), comp.contiguous()


def _blocks(H, D, window):
    HP = next_pow2(H)
    BD = max(16, next_pow2(D))
    BJ = 64 if window >= 64 else 32
    return HP, BD, BJ


def hca_attn_fwd(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0):
    from .triton_decode import hca_attn_decode_fwd, use_decode_path    # few queries, no grad: split-KV decode
    if use_decode_path(q, kv, comp):
        return hca_attn_decode_fwd(q, kv, comp, sink, scale, window, ratio, q_offset)
    check_device(q, kv, comp, sink)
    q, kv, comp = _prep(q, kv, comp)
    B, T, H, D = q.shape
    Tk, S = kv.shape[1], comp.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    HP, BD, BJ = _blocks(H, D, window)
    sink_t = sink.float().contiguous() if sink is not None else lse
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"] // HP), B)  # noqa: E731
    _hca_fwd[grid](q, kv, comp, sink_t, o, lse, T, Tk, S, q_offset, scale * LOG2E,
                   q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), comp.stride(0),
                   comp.stride(1), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                   H=H, HP=HP, D=D, W=window, RATIO=ratio, BLOCK_D=BD, BLOCK_J=BJ,
                   HAS_SINK=sink is not None, DOT_DT=dot_dtype(q))
    return o, lse


def hca_attn_bwd(do, q, kv, comp, sink, o, lse, scale: float, window: int, ratio: int, q_offset: int = 0):
    q, kv, comp = _prep(q, kv, comp)
    do, o = do.contiguous(), o.contiguous()
    B, T, H, D = q.shape
    Tk, S = kv.shape[1], comp.shape[1]
    HP, BD, BJ = _blocks(H, D, window)
    BM = 64
    dq = torch.empty(B, T, H, D, device=q.device, dtype=torch.float32)
    dkv = torch.zeros(B, Tk, D, device=q.device, dtype=torch.float32)
    dc = torch.zeros(B, S, D, device=q.device, dtype=torch.float32)
    delta = torch.empty_like(lse)
    if T > 0:
        _hca_bwd[(triton.cdiv(T, BM // HP), B)](
            q, kv, comp, o, do, lse, dq, dkv, dc, delta, T, Tk, S, q_offset, scale,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), comp.stride(0), comp.stride(1),
            o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            H=H, HP=HP, D=D, W=window, RATIO=ratio, BLOCK_D=BD, BLOCK_J=32 if BD > 64 else BJ, BLOCK_M=BM,
            BLOCK_S=32, DOT_DT=dot_dtype(q), num_warps=4, num_stages=1)
    dsink = None
    if sink is not None:
        dsink = (-(torch.exp(sink.float().view(1, 1, H) - lse) * delta).sum((0, 1))).to(sink.dtype)
    return dq.to(q.dtype), dkv.to(kv.dtype), dc.to(comp.dtype), dsink


class HCAAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, comp, sink, scale, window, ratio, q_offset):
        o, lse = hca_attn_fwd(q, kv, comp, sink, scale, window, ratio, q_offset)
        ctx.save_for_backward(q, kv, comp, sink, o, lse)
        ctx.cfg = (scale, window, ratio, q_offset)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, kv, comp, sink, o, lse = ctx.saved_tensors
        dq, dkv, dc, dsink = hca_attn_bwd(do, q, kv, comp, sink, o, lse, *ctx.cfg)
        return dq, dkv, dc, dsink, None, None, None, None


def hca_attn_triton(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0,
                    return_lse: bool = False):
    o, lse = HCAAttnFn.apply(q, kv, comp, sink, scale, window, ratio, q_offset)
    return (o, lse) if return_lse else o
