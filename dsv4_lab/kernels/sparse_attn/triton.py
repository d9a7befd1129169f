"""CSA core attention in Triton: forward and backward (same interface as naive.py).

Design (docs/kernels.md §2.2-2.3): query-major, one program per (query token, batch); all H heads of the token are the
M rows of every tl.dot (padded to >= 16). One online softmax (exp2 domain) runs first over the window rows
(contiguous) then over the selected compressed rows (pointer gather of BLOCK_K indices at a time, -1 / out-of-range
masked); the sink initialises (m, l) = (sink, 1), so it only enlarges the denominator.

Backward, two launches (K = V, so d(entry) = p^T dO + scale * dS^T Q; p recomputed from the saved lse):
  * query-major (_sparse_bwd): one program per query writes dQ over its window and its picks, and adds d(entry) of
    every pick with fp32 atomics into a one-head fp32 buffer (docs/kernels.md §2.2: the attention-gym fast path;
    non-deterministic summation order);
  * key-major (_window_bwd): one program per block of BLOCK_N window keys walks the queries whose window holds them
    (positions j .. j + W - 1), BLOCK_M queries x all heads per tile, and writes their d(entry) once: no atomics. The
    W queries that share a window key would otherwise add to the same address one after the other.
d(sink_h) = -sum_t exp(sink_h - lse) * delta.
"""
from __future__ import annotations

import torch

from .._common import autotune, check_device, configs, dot_dtype, jit, next_pow2, tl, triton

LOG2E = 1.4426950408889634


def _fwd_configs():
    return configs([triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
                    for bk in (32, 64) for w in (4,) for s in (2,)],
                   triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=1))


@jit
def _load_rows(ptr_base, rows, row_stride, offs_d, valid, D: tl.constexpr):
    ptrs = ptr_base + rows.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@autotune(configs=_fwd_configs(), key=["H", "D", "W", "K_SEL"])
@jit
def _sparse_fwd(Q, KV, C, IDX, SINK, O, LSE,
                T, Tk, S, q_offset, qk_scale,                      # qk_scale = scale * log2(e)
                sqb, sqt, sqh, skb, skt, scb, scs, sib, sit, sob, sot, soh, slb, slt,
                H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, K_SEL: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_SINK: tl.constexpr, DOT_DT: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = q_offset + t
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    q = tl.load(Q + b * sqb + t * sqt + offs_h[:, None] * sqh + offs_d[None, :],
                mask=hmask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    qd = (q * qk_scale).to(DOT_DT)
    if HAS_SINK:
        m_i = tl.load(SINK + offs_h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.minimum(m_i, 1e30)
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    else:
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # --- window rows pos-W+1 .. pos (contiguous) ---
    for jb in range(0, W, BLOCK_W):
        j = pos - W + 1 + jb + tl.arange(0, BLOCK_W)
        valid = (j >= 0) & (j <= pos) & (j < Tk) & (jb + tl.arange(0, BLOCK_W) < W)
        e = _load_rows(KV + b * skb, j, skt, offs_d, valid, D)
        ed = e.to(DOT_DT)
        s = tl.dot(qd, tl.trans(ed))
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), ed)
        m_i = m_new
    # --- selected compressed rows (gather) ---
    for kb in range(0, K_SEL, BLOCK_K):
        offs_k = kb + tl.arange(0, BLOCK_K)
        sidx = tl.load(IDX + b * sib + t * sit + offs_k, mask=offs_k < K_SEL, other=-1)
        valid = (sidx >= 0) & (sidx < S)
        e = _load_rows(C + b * scb, sidx, scs, offs_d, valid, D)
        ed = e.to(DOT_DT)
        s = tl.dot(qd, tl.trans(ed))
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), ed)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * sob + t * sot + offs_h[:, None] * soh + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=hmask[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + b * slb + t * slt + offs_h, lse, mask=hmask)


@jit
def _bwd_scores(qd, dod, lse2, delta, ed, keep):
    """p and dS = p (dP - delta) of rows (query heads) x entries ed (BLOCK_N, BLOCK_D), zero where not `keep`;
    qd is q * scale * log2(e) (log2-domain scores against lse2 = lse * log2(e))."""
    s = tl.dot(qd, tl.trans(ed))
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(dod, tl.trans(ed))
    return p, p * (dp - delta[:, None])


@jit
def _d_entries(p, ds, dod, q_dt, scale, DOT_DT: tl.constexpr):
    """d(entries) (BLOCK_N, BLOCK_D) fp32 = p^T dO + scale * dS^T Q (K = V)."""
    return tl.dot(tl.trans(p).to(DOT_DT), dod) + tl.dot(tl.trans(ds).to(DOT_DT), q_dt) * scale


def _bwd_configs():
    return configs([triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
                    for bk in (16, 32, 64) for w in (4, 8) for st in (1, 2)],
                   triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=1))


# the autotuner times every config on the real arguments: DC (atomics) is zeroed before each trial and again before
# the chosen config runs; DQ and DELTA are plain stores
@autotune(configs=_bwd_configs(), key=["H", "D", "W", "K_SEL"], reset_to_zero=["DC"])
@jit
def _sparse_bwd(Q, KV, C, IDX, O, DO, LSE, DQ, DC, DELTA,
                T, Tk, S, q_offset, scale,
                sqb, sqt, sqh, skb, skt, scb, scs, sib, sit, sob, sot, soh, slb, slt,
                H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, K_SEL: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, DOT_DT: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # DQ has q's strides (fp32); DC (B, S, D) is contiguous fp32; DELTA has LSE's strides
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = q_offset + t
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    dmask = offs_d < D
    hd = hmask[:, None] & dmask[None, :]
    qo = b * sqb + t * sqt + offs_h[:, None] * sqh + offs_d[None, :]
    oo = b * sob + t * sot + offs_h[:, None] * soh + offs_d[None, :]
    q = tl.load(Q + qo, mask=hd, other=0.0).to(tl.float32)
    o = tl.load(O + oo, mask=hd, other=0.0).to(tl.float32)
    do = tl.load(DO + oo, mask=hd, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * slb + t * slt + offs_h, mask=hmask, other=0.0)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + b * slb + t * slt + offs_h, delta, mask=hmask)
    lse2 = lse * 1.4426950408889634
    qd = (q * (scale * 1.4426950408889634)).to(DOT_DT)
    dod = do.to(DOT_DT)
    q_dt = q.to(DOT_DT)
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for jb in range(0, W, BLOCK_W):                                # window: dQ only (d(entry): _window_bwd)
        j = pos - W + 1 + jb + tl.arange(0, BLOCK_W)
        valid = (j >= 0) & (j <= pos) & (j < Tk) & (jb + tl.arange(0, BLOCK_W) < W)
        ed = _load_rows(KV + b * skb, j, skt, offs_d, valid, D).to(DOT_DT)
        p, ds = _bwd_scores(qd, dod, lse2, delta, ed, hmask[:, None] & valid[None, :])
        dq += tl.dot(ds.to(DOT_DT), ed)
    for kb in range(0, K_SEL, BLOCK_K):                            # picks: dQ and d(entry) by atomics
        offs_k = kb + tl.arange(0, BLOCK_K)
        sidx = tl.load(IDX + b * sib + t * sit + offs_k, mask=offs_k < K_SEL, other=-1)
        valid = (sidx >= 0) & (sidx < S)
        ed = _load_rows(C + b * scb, sidx, scs, offs_d, valid, D).to(DOT_DT)
        p, ds = _bwd_scores(qd, dod, lse2, delta, ed, hmask[:, None] & valid[None, :])
        dq += tl.dot(ds.to(DOT_DT), ed)
        tl.atomic_add(DC + b * S * D + sidx.to(tl.int64)[:, None] * D + offs_d[None, :],
                      _d_entries(p, ds, dod, q_dt, scale, DOT_DT), mask=valid[:, None] & dmask[None, :], sem="relaxed")
    tl.store(DQ + qo, dq * scale, mask=hd)


def _window_configs():
    return configs([triton.Config({"ROWS": r, "BLOCK_N": n}, num_warps=w)
                    for r, n, w in ((64, 64, 4), (128, 64, 8), (128, 32, 4), (64, 32, 4), (256, 64, 8))],
                   triton.Config({"ROWS": 32, "BLOCK_N": 16}, num_warps=4))


@autotune(configs=_window_configs(), key=["H", "D", "W"])
@jit
def _window_bwd(Q, KV, DO, LSE, DELTA, DKV,
                T, Tk, q_offset, scale,
                sqb, sqt, sqh, skb, skt, sob, sot, soh, slb, slt,
                H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BLOCK_HP: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_DT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    # d(entry) of window keys j = n0 .. n0 + BLOCK_N - 1: the queries at positions j .. j + W - 1 see key j, i.e.
    # t in [n0 - q_offset, n0 + BLOCK_N + W - 2 - q_offset]; a tile = BLOCK_M queries x BLOCK_HP (>= H) heads,
    # row r = (t0 + r // BLOCK_HP, head r % BLOCK_HP), R = max(ROWS, BLOCK_HP) rows. DELTA (written by _sparse_bwd)
    # has LSE's strides.
    R: tl.constexpr = ROWS if ROWS >= BLOCK_HP else BLOCK_HP
    BLOCK_M: tl.constexpr = R // BLOCK_HP
    n0 = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nmask = offs_n < Tk
    ed = _load_rows(KV + b * skb, offs_n, skt, offs_d, nmask, D).to(DOT_DT)            # (BN, BD)
    rh = tl.arange(0, R) % BLOCK_HP
    rt = tl.arange(0, R) // BLOCK_HP
    t_lo = tl.maximum(n0 - q_offset, 0)
    t_hi = tl.minimum(n0 + BLOCK_N + W - 2 - q_offset, T - 1)
    de = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for t0 in range(t_lo, t_hi + 1, BLOCK_M):
        t = t0 + rt
        rmask = (t <= t_hi) & (rh < H)
        rd = rmask[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + t[:, None] * sqt + rh[:, None] * sqh + offs_d[None, :], mask=rd, other=0.0)
        do = tl.load(DO + b * sob + t[:, None] * sot + rh[:, None] * soh + offs_d[None, :], mask=rd,
                     other=0.0).to(DOT_DT)
        lse2 = tl.load(LSE + b * slb + t * slt + rh, mask=rmask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b * slb + t * slt + rh, mask=rmask, other=0.0)
        pos = q_offset + t
        keep = rmask[:, None] & nmask[None, :] & (offs_n[None, :] <= pos[:, None]) & \
            (offs_n[None, :] > pos[:, None] - W)
        q = q.to(tl.float32)
        p, ds = _bwd_scores((q * (scale * 1.4426950408889634)).to(DOT_DT), do, lse2, delta, ed, keep)
        de += _d_entries(p, ds, do, q.to(DOT_DT), scale, DOT_DT)
    tl.store(DKV + b * Tk * D + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], de,
             mask=nmask[:, None] & dmask[None, :])


def _prep(q, kv, comp, idx):
    B, T, H, D = q.shape
    assert kv.dim() == 3 and comp.dim() == 3 and idx.dim() == 3, "kv (B, Tk, D), comp (B, S, D), idx (B, T, K)"
    assert kv.shape[0] == B and comp.shape[0] == B and idx.shape[:2] == (B, T), "batch / length mismatch"
    assert kv.shape[2] == D and comp.shape[2] == D, f"entry dim must be D = {D}"
    q = q.contiguous() if q.stride(-1) != 1 else q
    kv = kv.contiguous()
    comp = comp.contiguous()
    idx = idx.to(torch.int32).contiguous()
    return q, kv, comp, idx


def sparse_attn_fwd(q, kv, comp, idx, sink, scale: float, window: int, q_offset: int = 0):
    from .triton_decode import sparse_attn_decode_fwd, use_decode_path  # few queries, no grad: split-KV decode
    if use_decode_path(q, kv, comp):
        return sparse_attn_decode_fwd(q, kv, comp, idx, sink, scale, window, q_offset)
    check_device(q, kv, comp, idx, sink)
    q, kv, comp, idx = _prep(q, kv, comp, idx)
    B, T, H, D = q.shape
    Tk, S, K = kv.shape[1], comp.shape[1], idx.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    BH, BD = max(16, next_pow2(H)), max(16, next_pow2(D))
    BW = min(64, max(16, next_pow2(window))) if window > 0 else 16
    sink_t = sink.float().contiguous() if sink is not None else lse
    if T == 0:
        return o, lse
    _sparse_fwd[(T, B)](q, kv, comp, idx, sink_t, o, lse, T, Tk, S, q_offset, scale * LOG2E,
                        *q.stride()[:3], *kv.stride()[:2], *comp.stride()[:2], *idx.stride()[:2],
                        *o.stride()[:3], *lse.stride()[:2],             # one stride() call per tensor: host time
                        H=H, D=D, W=window, K_SEL=K, BLOCK_H=BH, BLOCK_D=BD, BLOCK_W=BW,
                        HAS_SINK=sink is not None, DOT_DT=dot_dtype(q))
    return o, lse


def sparse_attn_bwd(do, q, kv, comp, idx, sink, o, lse, scale: float, window: int, q_offset: int = 0):
    q, kv, comp, idx = _prep(q, kv, comp, idx)
    do = do.contiguous()
    o = o.contiguous()
    B, T, H, D = q.shape
    Tk, S, K = kv.shape[1], comp.shape[1], idx.shape[2]
    dq = torch.empty(B, T, H, D, device=q.device, dtype=torch.float32)
    dkv = torch.zeros(B, Tk, D, device=q.device, dtype=torch.float32)
    dc = torch.zeros(B, S, D, device=q.device, dtype=torch.float32)
    delta = torch.empty_like(lse)
    BH, BD = max(16, next_pow2(H)), max(16, next_pow2(D))
    BW = min(64, max(16, next_pow2(window))) if window > 0 else 16
    if T > 0:
        _sparse_bwd[(T, B)](q, kv, comp, idx, o, do, lse, dq, dc, delta, T, Tk, S, q_offset, scale,
                            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), comp.stride(0),
                            comp.stride(1), idx.stride(0), idx.stride(1), o.stride(0), o.stride(1), o.stride(2),
                            lse.stride(0), lse.stride(1),
                            H=H, D=D, W=window, K_SEL=K, BLOCK_H=BH, BLOCK_D=BD, BLOCK_W=BW, DOT_DT=dot_dtype(q))
        if window > 0:                                              # after _sparse_bwd: reads its delta
            _window_bwd[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B)](
                q, kv, do, lse, delta, dkv, T, Tk, q_offset, scale, q.stride(0), q.stride(1), q.stride(2),
                kv.stride(0), kv.stride(1), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                H=H, D=D, W=window, BLOCK_HP=next_pow2(H), BLOCK_D=BD, DOT_DT=dot_dtype(q))
    dsink = None
    if sink is not None:
        dsink = -(torch.exp(sink.float().view(1, 1, H) - lse) * delta).sum((0, 1))
        dsink = dsink.to(sink.dtype)
    return dq.to(q.dtype), dkv.to(kv.dtype), dc.to(comp.dtype), dsink


class SparseAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, comp, idx, sink, scale, window, q_offset):
        o, lse = sparse_attn_fwd(q, kv, comp, idx, sink, scale, window, q_offset)
        ctx.save_for_backward(q, kv, comp, idx, sink, o, lse)
        ctx.cfg = (scale, window, q_offset)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, kv, comp, idx, sink, o, lse = ctx.saved_tensors
        dq, dkv, dc, dsink = sparse_attn_bwd(do, q, kv, comp, idx, sink, o, lse, *ctx.cfg)
        return dq, dkv, dc, None, dsink, None, None, None


def sparse_attn_triton(q, kv, comp, idx, sink, scale: float, window: int, q_offset: int = 0,
                       return_lse: bool = False):
    o, lse = SparseAttnFn.apply(q, kv, comp, idx, sink, scale, window, q_offset)
    return (o, lse) if return_lse else o
