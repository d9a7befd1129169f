"""HCA core attention in Triton: forward and backward (same interface as naive.py).

Design (docs/kernels.md §2.3): dense FlashAttention-style tiles. One program owns BT consecutive queries x all heads
(BLOCK_M = BT * HP rows, HP = next_pow2(H)), so the M dimension of every tl.dot is 64-128 rows even with one KV
head. It streams the compressed entries 0 .. floor((t_last + 1) / ratio) - 1 (block-causal s < floor((t + 1) /
ratio): mask-free tiles while every row sees them, then a masked tail), then the window rows t0 - W + 1 .. t_last
(band tiles + one causal tail tile; masks only where a row can miss an entry), in one online softmax whose initial
state is the sink. The compressed KV is tiny (N / ratio rows) and stays in L2. KV tiles are loaded in their own
dtype (bf16 straight into tl.dot), the longest query tiles are scheduled first.

Backward: same tiling; recomputes p from the saved lse, writes dQ and adds the entries' gradients (K = V) with fp32
atomics (compressed and window entries are shared by many query tiles; non-deterministic summation order).
"""
from __future__ import annotations

import torch

from .._common import autotune, check_device, configs, dot_dtype, jit, next_pow2, tl, triton

LOG2E = 1.4426950408889634


def _fwd_configs():
    # few configs: each costs a compile (seconds) per key on the GPU. On an H200 (H 16, d 128, bf16):
    # BLOCK_M 64 (4 tokens x 16 heads), BLOCK_S 64, 4 warps, 2-3 stages won at 8K-128K (1.85 ms at 128K) over
    # BLOCK_S 128 (+8 %), BLOCK_M 128 with 4 or 8 warps (+13-22 %) and BLOCK_M 256 (+30 %); BLOCK_M 128 / 8 warps
    # stays for head counts where 64 rows hold few tokens
    return configs([triton.Config({"BLOCK_M": 64, "BLOCK_S": 64, "BLOCK_J": 64}, num_warps=4, num_stages=3),
                    triton.Config({"BLOCK_M": 64, "BLOCK_S": 64, "BLOCK_J": 64}, num_warps=4, num_stages=2),
                    triton.Config({"BLOCK_M": 128, "BLOCK_S": 64, "BLOCK_J": 64}, num_warps=8, num_stages=3)],
                   triton.Config({"BLOCK_M": 64, "BLOCK_S": 16, "BLOCK_J": 16}, num_warps=4, num_stages=1))


def _tail_width(meta):
    """Width of the causal tail tile (window rows pos0 + 1 .. pos0 + BT - 1): 0 when BT = 1, else >= 16 (tl.dot)."""
    bt = meta["BLOCK_M"] // meta["HP"]
    return 0 if bt == 1 else max(16, bt)


@jit
def _tile_rows(t0, T, q_offset, H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr):
    r = tl.arange(0, BLOCK_M)
    tq = t0 + r // HP
    h = r % HP
    rmask = (tq < T) & (h < H)
    return tq, h, rmask, q_offset + tq


@jit
def _load_rows(base, idx, stride, offs_d, valid, D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """Rows idx of a (rows, D) slab in its own dtype (no fp32 round trip: the tile feeds tl.dot from shared memory)."""
    ptrs = base + idx.to(tl.int64)[:, None] * stride + offs_d[None, :]
    if MASKED:
        if BLOCK_D == D:
            e = tl.load(ptrs, mask=valid[:, None], other=0.0)
        else:
            e = tl.load(ptrs, mask=valid[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if BLOCK_D == D:
            e = tl.load(ptrs)
        else:
            e = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return e


@jit
def _online_step(acc, m_i, l_i, qd, ed, vis, MASKED: tl.constexpr):
    """One KV tile of the online softmax (log2 domain; qd carries scale * log2 e). vis is ignored when not MASKED:
    every score is finite, so the running max needs no -inf guard."""
    sc = tl.dot(qd, tl.trans(ed))
    if MASKED:
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(sc - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(ed.dtype), ed)
    return acc, m_new, l_i


@jit
def _hca_fwd_kernel(Q, KV, C, SINK, O, LSE,
                    T, Tk, S, q_offset, kv_start, qk_scale, T_BUCKET,
                    sqb, sqt, sqh, skb, skt, scb, scs, sob, sot, soh, slb, slt,
                    H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, RATIO: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_T: tl.constexpr, HAS_SINK: tl.constexpr, DOT_DT: tl.constexpr):
    """Program = BT = BLOCK_M // HP consecutive queries x HP heads. KV tiles, in one online softmax from the sink:
    1. compressed s < nvis_lo = (pos0 + 1) // RATIO, seen by every row: full BLOCK_S tiles without masks;
    2. compressed tail up to nvis = (pos_last + 1) // RATIO: masked (s < (pos + 1) // RATIO);
    3. window band j in [pos0 - W + 1, pos0] (W rows, all j <= pos) in BLOCK_J tiles, masked j > pos - W, j >= 0
       (tiles past the first BT - 1 columns unmasked);
    4. causal tail j in [pos0 + 1, pos0 + BT - 1] in one BLOCK_T tile, masked j <= pos.
    3 + 4 cover W + BT - 1 rows in cdiv(W, BLOCK_J) * BLOCK_J + BLOCK_T columns (144 for W = 128, BT = 8)."""
    BT: tl.constexpr = BLOCK_M // HP
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BT            # last (longest) query tiles first
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
    cbase = C + b * scb
    kbase = KV + b * skb
    pos0 = q_offset + t0
    t_last = tl.minimum(t0 + BT, T) - 1
    # 1. compressed entries every row of the tile sees (block-causal: s < (pos + 1) // RATIO, pos >= pos0)
    nvis_lo = tl.minimum((pos0 + 1) // RATIO, S)
    n_full = (nvis_lo // BLOCK_S) * BLOCK_S
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, n_full, BLOCK_S):
        ed = _load_rows(cbase, s0 + offs_s, scs, offs_d, offs_s < BLOCK_S, D, BLOCK_D, False).to(DOT_DT)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, qd, ed, None, False)
    # 2. compressed tail (row-dependent visibility)
    nvis = tl.minimum((q_offset + t_last + 1) // RATIO, S)
    nvis_row = (pos + 1) // RATIO
    for s0 in range(n_full, nvis, BLOCK_S):
        s = s0 + offs_s
        smask = s < nvis
        ed = _load_rows(cbase, s, scs, offs_d, smask, D, BLOCK_D, True).to(DOT_DT)
        vis = (s[None, :] < nvis_row[:, None]) & smask[None, :]
        acc, m_i, l_i = _online_step(acc, m_i, l_i, qd, ed, vis, True)
    # 3. window band: j = pos0 - W + 1 + jj, jj < W (all j <= pos0 <= pos). A tile past the ragged first BT - 1
    #    columns and inside the band is seen whole by every row: no mask when it also lies in [0, Tk).
    if W > 0:
        offs_j = tl.arange(0, BLOCK_J)
        for jb in tl.static_range(0, W, BLOCK_J):
            jj = jb + offs_j
            j = pos0 - W + 1 + jj
            jmask = (jj < W) & (j >= kv_start) & (j < kv_start + Tk)
            vis = jmask[None, :] & (j[None, :] > pos[:, None] - W)
            if jb >= BT - 1:
                if jb + BLOCK_J <= W:
                    if (pos0 - W + 1 + jb >= kv_start) & (pos0 < kv_start + Tk):
                        ed = _load_rows(kbase, j - kv_start, skt, offs_d, jmask, D, BLOCK_D, False).to(DOT_DT)
                        acc, m_i, l_i = _online_step(acc, m_i, l_i, qd, ed, vis, False)
                    else:
                        ed = _load_rows(kbase, j - kv_start, skt, offs_d, jmask, D, BLOCK_D, True).to(DOT_DT)
                        acc, m_i, l_i = _online_step(acc, m_i, l_i, qd, ed, vis, True)
                else:
                    ed = _load_rows(kbase, j - kv_start, skt, offs_d, jmask, D, BLOCK_D, True).to(DOT_DT)
                    acc, m_i, l_i = _online_step(acc, m_i, l_i, qd, ed, vis, True)
            else:
                ed = _load_rows(kbase, j - kv_start, skt, offs_d, jmask, D, BLOCK_D, True).to(DOT_DT)
                acc, m_i, l_i = _online_step(acc, m_i, l_i, qd, ed, vis, True)
        # 4. causal tail: j = pos0 + 1 .. pos0 + BT - 1
        if BLOCK_T > 0:
            offs_t = tl.arange(0, BLOCK_T)
            j = pos0 + 1 + offs_t
            jmask = (offs_t < BT - 1) & (j < kv_start + Tk)
            ed = _load_rows(kbase, j - kv_start, skt, offs_d, jmask, D, BLOCK_D, True).to(DOT_DT)
            vis = jmask[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - W)
            acc, m_i, l_i = _online_step(acc, m_i, l_i, qd, ed, vis, True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * sob + tq.to(tl.int64)[:, None] * sot + h[:, None] * soh + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + b * slb + tq * slt + h, lse, mask=rmask)


_hca_fwd_kernel = triton.heuristics({"BLOCK_T": _tail_width})(_hca_fwd_kernel)
_hca_fwd = autotune(configs=_fwd_configs(), key=["H", "D", "W", "RATIO", "T_BUCKET"])(_hca_fwd_kernel)


@jit
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
                      mask=smask[:, None] & dmask[None, :], sem="relaxed")
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
                      mask=jmask[:, None] & dmask[None, :], sem="relaxed")
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


def hca_attn_fwd(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0, cfg: dict | None = None,
                 kv_start: int = 0):
    """cfg (prefill kernel only; benchmarks/ablations): {"BLOCK_M", "BLOCK_S", "BLOCK_J", "num_warps", "num_stages"}
    launches that one configuration instead of the autotuned list. kv[i] holds position kv_start + i."""
    from .triton_decode import hca_attn_decode_fwd, use_decode_path    # few queries, no grad: split-KV decode
    if use_decode_path(q, kv, comp):
        return hca_attn_decode_fwd(q, kv, comp, sink, scale, window, ratio, q_offset, kv_start=kv_start)
    check_device(q, kv, comp, sink)
    q, kv, comp = _prep(q, kv, comp)
    B, T, H, D = q.shape
    Tk, S = kv.shape[1], comp.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    HP, BD, _ = _blocks(H, D, window)
    sink_t = sink.float().contiguous() if sink is not None else lse
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"] // HP), B)  # noqa: E731
    kernel, meta = _hca_fwd, {}
    if cfg is not None:
        kernel, meta = _hca_fwd_kernel, dict(cfg)
    t_bucket = min(max(next_pow2(T), 1024), 1 << 17)                  # autotune once per length bucket
    kernel[grid](q, kv, comp, sink_t, o, lse, T, Tk, S, q_offset, kv_start, scale * LOG2E, t_bucket,
                 q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), comp.stride(0),
                 comp.stride(1), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                 H=H, HP=HP, D=D, W=window, RATIO=ratio, BLOCK_D=BD,
                 HAS_SINK=sink is not None, DOT_DT=dot_dtype(q), **meta)
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
    def forward(ctx, q, kv, comp, sink, scale, window, ratio, q_offset, kv_start):
        o, lse = hca_attn_fwd(q, kv, comp, sink, scale, window, ratio, q_offset, kv_start=kv_start)
        ctx.save_for_backward(q, kv, comp, sink, o, lse)
        ctx.cfg = (scale, window, ratio, q_offset)
        ctx.kv_start = kv_start
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, kv, comp, sink, o, lse = ctx.saved_tensors
        if ctx.kv_start != 0:
            raise NotImplementedError(f"hca_attn triton backward: kv_start = {ctx.kv_start} is not allowed: 0 "
                                      "(an offset window comes from a decode cache, which runs without gradients)")
        dq, dkv, dc, dsink = hca_attn_bwd(do, q, kv, comp, sink, o, lse, *ctx.cfg)
        return dq, dkv, dc, dsink, None, None, None, None, None


def hca_attn_triton(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0,
                    return_lse: bool = False, kv_start: int = 0):
    o, lse = HCAAttnFn.apply(q, kv, comp, sink, scale, window, ratio, q_offset, kv_start)
    return (o, lse) if return_lse else o
