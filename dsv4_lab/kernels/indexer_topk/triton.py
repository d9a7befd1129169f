"""Fused lightning-indexer scores + streaming top-k in Triton (same interface as naive.py; forward only).

One program owns BQ queries x all HI indexer heads (BQ * HIP rows of the score tl.dot). It walks the visible
compressed entries BS at a time, forms I = sum_h w_h ReLU(q_h . k) in registers, packs each score with its index
into one int64 key (order-preserving fp32 bits << 32 | (2^32 - 1 - s), so equal scores prefer the lower index:
the same tie rule as the naive twin's stable sort), and merges the chunk into a running, sorted top-KP list with
tl.topk over the concatenation. The [T, S] score matrix never touches memory (kernels.md §3, T4/T5): memory
traffic is the keys (re-read from L2 per query block), q, w and the k outputs.

A chunk is skipped without the merge when none of its keys beats the current k-th best of any query in the block.
"""
from __future__ import annotations

import torch

from .._common import check_device, configs, dot_dtype, next_pow2, tl, triton

NEG_INF_KEY = -2139095041 * (1 << 32)          # key of a -inf score: below every finite score's key


@triton.jit
def _keys(sc, s):
    bits = sc.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)                     # monotone signed-int image of the float
    return ordered.to(tl.int64) * 4294967296 + (4294967295 - s.to(tl.int64))


# num_stages=1: a pipelined fp32 key tile (BS x 64 x 4 B) overflowed shared memory (299 KB > 227 KB) on the H200
@triton.autotune(configs=configs([triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)],
                                 triton.Config({}, num_warps=4, num_stages=1)),
                 key=["HI", "DI", "K_TOP", "RATIO", "BQ"])
@triton.jit
def _indexer_topk_fwd(QI, KI, WT, IDX, VAL, T, S, q_offset,
                      sqb, sqt, sqh, skb, sks, swb, swt, sib, sit,
                      HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BLOCK_D: tl.constexpr,
                      K_TOP: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr, BQ: tl.constexpr,
                      RATIO: tl.constexpr, DOT_DT: tl.constexpr):
    R: tl.constexpr = BQ * HIP
    t0 = tl.program_id(0) * BQ
    b = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, R)
    tr = t0 + r // HIP
    hr = r % HIP
    rmask = (tr < T) & (hr < HI)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < DI
    q = tl.load(QI + b * sqb + tr.to(tl.int64)[:, None] * sqt + hr[:, None] * sqh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    qd = q.to(DOT_DT)
    wr = tl.load(WT + b * swb + tr.to(tl.int64) * swt + hr, mask=rmask, other=0.0).to(tl.float32)
    tq = t0 + tl.arange(0, BQ)
    nvis_q = tl.minimum((q_offset + tq + 1) // RATIO, S)                       # (BQ,)
    t_last = tl.minimum(t0 + BQ, T) - 1
    nvis = tl.minimum((q_offset + t_last + 1) // RATIO, S)
    run = tl.full([BQ, KP], -9187343241974906880, tl.int64)                    # NEG_INF_KEY: empty slots
    for s0 in range(0, nvis, BS):
        s = s0 + tl.arange(0, BS)
        smask = s < nvis
        kb = tl.load(KI + b * skb + s.to(tl.int64)[:, None] * sks + offs_d[None, :],
                     mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        logit = tl.dot(qd, tl.trans(kb.to(DOT_DT)))                             # (R, BS)
        logit = tl.maximum(logit, 0.0) * wr[:, None]
        sc = tl.sum(tl.reshape(logit, [BQ, HIP, BS]), 1)                        # (BQ, BS)
        sc = tl.where(s[None, :] < nvis_q[:, None], sc, float("-inf"))
        keys = _keys(sc, s[None, :])
        if BS > KP:
            keys = tl.topk(keys, KP)
        thr = tl.min(run, 1)
        better = tl.max(keys, 1) > thr
        if tl.max(better.to(tl.int32), 0) > 0:
            run = tl.topk(tl.reshape(tl.join(run, keys), [BQ, 2 * KP]), KP)
    ordered = (run >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    val = bits.to(tl.float32, bitcast=True)
    sidx = (4294967295 - (run & 4294967295)).to(tl.int32)
    valid = ordered > -2139095041
    sidx = tl.where(valid, sidx, -1)
    val = tl.where(valid, val, float("-inf"))
    kk = tl.arange(0, KP)
    om = (tq[:, None] < T) & (kk[None, :] < K_TOP)
    off = b * sib + tq.to(tl.int64)[:, None] * sit + kk[None, :]
    tl.store(IDX + off, sidx, mask=om)
    tl.store(VAL + off, val, mask=om)


def indexer_topk_triton(qI, kI, w, k: int, ratio: int, q_offset: int = 0, return_scores: bool = False):
    check_device(qI, kI, w)
    B, T, HI, DI = qI.shape
    S = kI.shape[1]
    assert kI.shape == (B, S, DI) and w.shape == (B, T, HI), "qI (B, T, HI, DI), kI (B, S, DI), w (B, T, HI)"
    qI = qI.contiguous()
    kI = kI.contiguous()
    w = w.contiguous()
    idx = torch.empty(B, T, k, dtype=torch.int32, device=qI.device)
    val = torch.empty(B, T, k, dtype=torch.float32, device=qI.device)
    if T > 0 and k > 0:
        HIP = next_pow2(HI)
        KP = next_pow2(k)
        BQ = max(1, 16 // HIP) if KP <= 512 else max(1, 16 // HIP)
        BS = max(KP, 32)
        _indexer_topk_fwd[(triton.cdiv(T, BQ), B)](
            qI, kI, w, idx, val, T, S, q_offset,
            qI.stride(0), qI.stride(1), qI.stride(2), kI.stride(0), kI.stride(1), w.stride(0), w.stride(1),
            idx.stride(0), idx.stride(1),
            HI=HI, HIP=HIP, DI=DI, BLOCK_D=max(16, next_pow2(DI)), K_TOP=k, KP=KP, BS=BS, BQ=BQ, RATIO=ratio,
            DOT_DT=dot_dtype(qI))
    return (idx, val) if return_scores else idx
