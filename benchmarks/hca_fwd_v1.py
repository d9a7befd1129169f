"""Frozen copy of the HCA prefill forward kernel as of commit 5e889ef (run-2 number: 2.70 ms at 128K on the H200),
kept only so bench_hca.py can time the old and the current kernel (dsv4_lab/kernels/hca_attn/triton.py) in the same
run. Not used by the library. Same arguments as hca_attn_fwd (prefill path only)."""
from __future__ import annotations

import torch

from dsv4_lab.kernels._common import configs, dot_dtype, next_pow2, tl, triton
from dsv4_lab.kernels.hca_attn.triton import LOG2E, _prep


def _blocks(H, D, window):
    HP = next_pow2(H)
    BD = max(16, next_pow2(D))
    BJ = 64 if window >= 64 else 32
    return HP, BD, BJ


def _fwd_configs_v1():
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


@triton.autotune(configs=_fwd_configs_v1(), key=["H", "D", "W", "RATIO"])
@triton.jit
def _hca_fwd_v1(Q, KV, C, SINK, O, LSE,
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


def hca_attn_fwd_v1(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0):
    q, kv, comp = _prep(q, kv, comp)
    B, T, H, D = q.shape
    Tk, S = kv.shape[1], comp.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    HP, BD, BJ = _blocks(H, D, window)
    sink_t = sink.float().contiguous() if sink is not None else lse
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"] // HP), B)  # noqa: E731
    _hca_fwd_v1[grid](q, kv, comp, sink_t, o, lse, T, Tk, S, q_offset, scale * LOG2E,
                      q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), comp.stride(0),
                      comp.stride(1), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                      H=H, HP=HP, D=D, W=window, RATIO=ratio, BLOCK_D=BD, BLOCK_J=BJ,
                      HAS_SINK=sink is not None, DOT_DT=dot_dtype(q))
    return o, lse
