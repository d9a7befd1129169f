"""Sparse-stage indexer KL loss in Triton: forward and backward (same interface as naive.py; docs §10).

Design: one program per query row (t, b); the K picks are walked BLOCK_K at a time, each block gathering its comp
rows (BLOCK_K, c) and kI rows (BLOCK_K, c_I) by pointer (-1 / >= S masked), so the gathered (B, T, K, c) and
(B, T, K, c_I) tensors of the naive twin never exist. Per block:
    z = q (H, c) comp^T -> (H, BLOCK_K)      tl.dot, H padded to 16; p_k = sum_h exp(scale z_hk - lse_h), 0 if invalid
    l = qI (n_I, c_I) kI^T -> (n_I, BLOCK_K)  tl.dot, n_I padded to 16; I_k = sum_j w_j ReLU(l_jk)
One pass, online over the blocks, lane-wise (BLOCK_K lanes, reduced once at the end): P = sum p, A = sum p log p,
D = sum p I and the logsumexp (m, L) of I over the valid picks. With target t = p / P (sum t = 1):
    KL = sum t log t - sum t I + lse_I = A / P - log P - D / P + lse_I,     row kept iff P > 0 (else KL = 0)
Written: KL (B, T) fp32, per row [kept, lse_I, P] (B, T, 3) fp32, and p (B, T, K) fp32 when a gradient is needed.
The loss sum KL / max(sum kept, 1) is formed in torch on the device (no host sync); autograd hands the backward
g_r = dloss / dKL_r per row.

Backward, per kept row (g_r = 0 elsewhere: rows whose target is all zero give no gradient): recompute l (the same
dot as the forward, so I and lse_I agree) and
    dI_k  = g_r (exp(I_k - lse_I) - p_k / P) on valid picks               (d KL / d I = softmax(I) - t)
    dw_j  = sum_k dI_k ReLU(l_jk);   dl_jk = dI_k w_j 1[l_jk > 0]          (ReLU'(0) = 0, as torch)
    dqI   = dl kI (n_I, c_I);         dkI[s_k] += (dl^T qI)_k               (fp32 tl.atomic_add into (B, S, c_I))
A repeated pick is counted per occurrence (each lane adds its own atomic). The dkI summation order is not
deterministic.
BLOCK_K, warps and stages are autotuned per shape (the backward's dkI buffer is zeroed before every trial).

Precision: q / comp and qI / kI dots take bf16 operands for bf16 inputs (exact products, fp32 accumulate) and
input_precision="ieee" for fp32 inputs (no TF32, so the target and the scores match the fp32 reference tightly);
the gradient dots (fp32 dl times kI / qI) take fp32 operands, TF32 for bf16 inputs, ieee for fp32. Under the
interpreter every dot is fp32 (`dot_dtype`).
"""
from __future__ import annotations

import torch

from .._common import autotune, check_device, configs, dot_dtype, jit, next_pow2, tl, triton

@jit
def _gather(ptr_base, rows, row_stride, offs_d, valid, D: tl.constexpr):
    """Rows `rows` (BLOCK_K,) of a (., D) matrix, zero where not valid: (BLOCK_K, BLOCK_D) in the stored dtype."""
    ptrs = ptr_base + rows.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)


def _configs():
    return configs([triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
                    for bk in (32, 64, 128) for w in (4, 8) for st in (1, 2)],
                   triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=1))


@autotune(configs=_configs(), key=["H", "CD", "NI", "CI", "K_SEL", "STORE_P"])
@jit
def _kl_fwd(Q, C, IDX, LSE, QI, KI, W, KL, STAT, PBUF,
            T, S, scale,
            sqb, sqt, sqh, scb, scs, sib, sit, slb, slt, sab, sat, saj, skb, sks, swb, swt,
            H: tl.constexpr, CD: tl.constexpr, NI: tl.constexpr, CI: tl.constexpr, K_SEL: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CI: tl.constexpr,
            DOT_Z: tl.constexpr, DOT_I: tl.constexpr, PREC_Z: tl.constexpr, PREC_I: tl.constexpr,
            STORE_P: tl.constexpr, BLOCK_K: tl.constexpr):
    # KL (B*T,), STAT (B*T, 3) and PBUF (B*T, K_SEL) are contiguous fp32
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * T + t
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, BLOCK_J)
    offs_ci = tl.arange(0, BLOCK_CI)
    hmask = offs_h < H
    jmask = offs_j < NI
    q = tl.load(Q + b * sqb + t * sqt + offs_h[:, None] * sqh + offs_c[None, :],
                mask=hmask[:, None] & (offs_c[None, :] < CD), other=0.0).to(DOT_Z)               # (BH, BC)
    lse = tl.load(LSE + b * slb + t * slt + offs_h, mask=hmask, other=float("inf"))             # pad: p = 0
    qi = tl.load(QI + b * sab + t * sat + offs_j[:, None] * saj + offs_ci[None, :],
                 mask=jmask[:, None] & (offs_ci[None, :] < CI), other=0.0).to(DOT_I)            # (BJ, BCI)
    wj = tl.load(W + b * swb + t * swt + offs_j, mask=jmask, other=0.0).to(tl.float32)          # (BJ,)
    p_acc = tl.zeros([BLOCK_K], tl.float32)                    # lane-wise sums over the blocks
    a_acc = tl.zeros([BLOCK_K], tl.float32)
    d_acc = tl.zeros([BLOCK_K], tl.float32)
    m_i = tl.full([BLOCK_K], float("-inf"), tl.float32)        # lane-wise online logsumexp of I
    l_i = tl.zeros([BLOCK_K], tl.float32)
    for kb in range(0, K_SEL, BLOCK_K):
        offs_k = kb + tl.arange(0, BLOCK_K)
        kmask = offs_k < K_SEL
        sidx = tl.load(IDX + b * sib + t * sit + offs_k, mask=kmask, other=-1)
        valid = (sidx >= 0) & (sidx < S)
        e = _gather(C + b * scb, sidx, scs, offs_c, valid, CD).to(DOT_Z)                        # (BK, BC)
        z = tl.dot(q, tl.trans(e), input_precision=PREC_Z)                                      # (BH, BK)
        p = tl.sum(tl.exp(z * scale - lse[:, None]), 0)
        p = tl.where(valid, p, 0.0)                                                             # (BK,)
        kk = _gather(KI + b * skb, sidx, sks, offs_ci, valid, CI).to(DOT_I)                     # (BK, BCI)
        lg = tl.dot(qi, tl.trans(kk), input_precision=PREC_I)                                   # (BJ, BK)
        sc = tl.sum(wj[:, None] * tl.maximum(lg, 0.0), 0)                                       # I (BK,)
        p_acc += p
        a_acc += tl.where(p > 0.0, p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0)                 # xlogy(p, p)
        d_acc += tl.where(valid, p * sc, 0.0)
        sc_m = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m_i, sc_m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.exp(sc_m - m_safe)
        m_i = m_new
        if STORE_P:
            tl.store(PBUF + row * K_SEL + offs_k, p, mask=kmask)
    m = tl.max(m_i, 0)
    m_s = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(l_i * tl.exp(m_i - m_s), 0)
    lse_i = tl.where(l_sum > 0.0, m_s + tl.log(tl.where(l_sum > 0.0, l_sum, 1.0)), float("-inf"))  # no pick: -inf
    p_tot = tl.sum(p_acc, 0)
    kept = p_tot > 0.0
    p_s = tl.where(kept, p_tot, 1.0)
    kl = (tl.sum(a_acc, 0) - tl.sum(d_acc, 0)) / p_s - tl.log(p_s) + lse_i
    tl.store(KL + row, tl.where(kept, kl, 0.0))
    tl.store(STAT + row * 3, kept.to(tl.float32))
    tl.store(STAT + row * 3 + 1, lse_i)
    tl.store(STAT + row * 3 + 2, p_tot)


# DKI takes atomics: the autotuner zeroes it before each trial and before the chosen config runs
@autotune(configs=_configs(), key=["NI", "CI", "K_SEL"], reset_to_zero=["DKI"])
@jit
def _kl_bwd(QI, KI, W, IDX, STAT, PBUF, DKL, DQI, DKI, DW,
            T, S,
            sib, sit, sab, sat, saj, skb, sks, swb, swt,
            NI: tl.constexpr, CI: tl.constexpr, K_SEL: tl.constexpr,
            BLOCK_J: tl.constexpr, BLOCK_CI: tl.constexpr,
            DOT_I: tl.constexpr, PREC_I: tl.constexpr, PREC_G: tl.constexpr, BLOCK_K: tl.constexpr):
    # DKL (B*T,), STAT (B*T, 3), PBUF (B*T, K_SEL), DQI (B, T, NI, CI), DKI (B, S, CI), DW (B, T, NI): contiguous fp32
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * T + t
    offs_j = tl.arange(0, BLOCK_J)
    offs_ci = tl.arange(0, BLOCK_CI)
    jmask = offs_j < NI
    cimask = offs_ci < CI
    jc = jmask[:, None] & cimask[None, :]
    qraw = tl.load(QI + b * sab + t * sat + offs_j[:, None] * saj + offs_ci[None, :], mask=jc, other=0.0)
    qi = qraw.to(DOT_I)
    q32 = qraw.to(tl.float32)
    wj = tl.load(W + b * swb + t * swt + offs_j, mask=jmask, other=0.0).to(tl.float32)
    kept = tl.load(STAT + row * 3)
    lse_i = tl.load(STAT + row * 3 + 1)
    p_tot = tl.load(STAT + row * 3 + 2)
    g = tl.load(DKL + row)
    dq = tl.zeros([BLOCK_J, BLOCK_CI], tl.float32)
    dw = tl.zeros([BLOCK_J], tl.float32)
    if kept > 0.0:
        inv_p = 1.0 / p_tot
        for kb in range(0, K_SEL, BLOCK_K):
            offs_k = kb + tl.arange(0, BLOCK_K)
            kmask = offs_k < K_SEL
            sidx = tl.load(IDX + b * sib + t * sit + offs_k, mask=kmask, other=-1)
            valid = (sidx >= 0) & (sidx < S)
            kraw = _gather(KI + b * skb, sidx, sks, offs_ci, valid, CI)                           # (BK, BCI)
            lg = tl.dot(qi, tl.trans(kraw.to(DOT_I)), input_precision=PREC_I)                     # (BJ, BK)
            sc = tl.sum(wj[:, None] * tl.maximum(lg, 0.0), 0)                                     # I (BK,)
            p = tl.load(PBUF + row * K_SEL + offs_k, mask=kmask, other=0.0)
            d_i = tl.where(valid, g * (tl.exp(sc - lse_i) - p * inv_p), 0.0)                      # (BK,)
            dw += tl.sum(tl.maximum(lg, 0.0) * d_i[None, :], 1)
            dl = tl.where(lg > 0.0, wj[:, None] * d_i[None, :], 0.0)                              # (BJ, BK)
            dq += tl.dot(dl, kraw.to(tl.float32), input_precision=PREC_G)
            dk = tl.dot(tl.trans(dl), q32, input_precision=PREC_G)                                # (BK, BCI)
            tl.atomic_add(DKI + (b * S + sidx.to(tl.int64))[:, None] * CI + offs_ci[None, :], dk,
                          mask=valid[:, None] & cimask[None, :], sem="relaxed")
    tl.store(DQI + row * NI * CI + offs_j[:, None] * CI + offs_ci[None, :], dq, mask=jc)
    tl.store(DW + row * NI + offs_j, dw, mask=jmask)


def _last_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _prep(q, comp, idx, lse, qI, kI, w):
    B, T, H, CD = q.shape
    assert comp.dim() == 3 and comp.shape[0] == B and comp.shape[2] == CD, "comp (B, S, c)"
    assert idx.dim() == 3 and idx.shape[:2] == (B, T), "idx (B, T, K)"
    assert lse.shape == (B, T, H), "lse (B, T, H)"
    assert qI.dim() == 4 and qI.shape[:2] == (B, T), "qI (B, T, n_I, c_I)"
    assert kI.shape == (B, comp.shape[1], qI.shape[3]), "kI (B, S, c_I)"
    assert w.shape == qI.shape[:3], "w (B, T, n_I)"
    return (_last_contig(q), _last_contig(comp), idx.to(torch.int32).contiguous(), _last_contig(lse.float()),
            _last_contig(qI), _last_contig(kI), _last_contig(w))


def _dots(a, b):
    """(operand dtype, input_precision) of a dot of a by b: their 16-bit type when both share it (exact products),
    else fp32 with ieee precision (no TF32)."""
    if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        return dot_dtype(a), "tf32"
    return tl.float32, "ieee"


def sparse_kl_fwd(q, comp, idx, lse, scale: float, qI, kI, w, store_p: bool = True):
    """-> kl (B, T) fp32 (0 on rows not kept), stat (B, T, 3) fp32 [kept, lse_I, P], p (B, T, K) fp32 or None."""
    check_device(q, comp, idx, lse, qI, kI, w)
    q, comp, idx, lse, qI, kI, w = _prep(q, comp, idx, lse, qI, kI, w)
    B, T, H, CD = q.shape
    S, K, NI, CI = comp.shape[1], idx.shape[2], qI.shape[2], qI.shape[3]
    dev = q.device
    kl = torch.empty(B, T, device=dev, dtype=torch.float32)
    stat = torch.empty(B, T, 3, device=dev, dtype=torch.float32)
    pbuf = torch.empty(B, T, K, device=dev, dtype=torch.float32) if store_p else kl
    if T == 0 or B == 0:
        return kl, stat, (pbuf if store_p else None)
    dz, pz = _dots(q, comp)
    di, pi = _dots(qI, kI)
    _kl_fwd[(T, B)](q, comp, idx, lse, qI, kI, w, kl, stat, pbuf, T, S, float(scale),
                    q.stride(0), q.stride(1), q.stride(2), comp.stride(0), comp.stride(1), idx.stride(0),
                    idx.stride(1), lse.stride(0), lse.stride(1), qI.stride(0), qI.stride(1), qI.stride(2),
                    kI.stride(0), kI.stride(1), w.stride(0), w.stride(1),
                    H=H, CD=CD, NI=NI, CI=CI, K_SEL=K, BLOCK_H=max(16, next_pow2(H)),
                    BLOCK_C=max(16, next_pow2(CD)), BLOCK_J=max(16, next_pow2(NI)), BLOCK_CI=max(16, next_pow2(CI)),
                    DOT_Z=dz, DOT_I=di, PREC_Z=pz, PREC_I=pi, STORE_P=store_p)
    return kl, stat, (pbuf if store_p else None)


def sparse_kl_bwd(dkl, qI, kI, w, idx, stat, pbuf):
    """dkl (B, T) per-row gradient -> (dqI, dkI, dw) in the inputs' dtypes."""
    idx = idx.to(torch.int32).contiguous()
    qI, kI, w = _last_contig(qI), _last_contig(kI), _last_contig(w)
    B, T, NI, CI = qI.shape
    S, K = kI.shape[1], idx.shape[2]
    dev = qI.device
    dqi = torch.empty(B, T, NI, CI, device=dev, dtype=torch.float32)
    dki = torch.zeros(B, S, CI, device=dev, dtype=torch.float32)
    dw = torch.empty(B, T, NI, device=dev, dtype=torch.float32)
    if T > 0 and B > 0:
        di, pi = _dots(qI, kI)
        pg = "ieee" if torch.float32 in (qI.dtype, kI.dtype) else "tf32"
        _kl_bwd[(T, B)](qI, kI, w, idx, stat, pbuf, dkl.float().contiguous(), dqi, dki, dw, T, S,
                        idx.stride(0), idx.stride(1), qI.stride(0), qI.stride(1), qI.stride(2),
                        kI.stride(0), kI.stride(1), w.stride(0), w.stride(1),
                        NI=NI, CI=CI, K_SEL=K, BLOCK_J=max(16, next_pow2(NI)), BLOCK_CI=max(16, next_pow2(CI)),
                        DOT_I=di, PREC_I=pi, PREC_G=pg)
    return dqi.to(qI.dtype), dki.to(kI.dtype), dw.to(w.dtype)


class SparseKLFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, comp, idx, lse, scale, qI, kI, w):
        need = any(ctx.needs_input_grad[5:8])
        kl, stat, pbuf = sparse_kl_fwd(q, comp, idx, lse, scale, qI, kI, w, store_p=need)
        kept = stat[..., 0].clone()
        if need:
            ctx.save_for_backward(qI, kI, w, idx, stat, pbuf)
        ctx.mark_non_differentiable(kept)
        return kl, kept

    @staticmethod
    def backward(ctx, dkl, dkept):
        qI, kI, w, idx, stat, pbuf = ctx.saved_tensors
        dqi, dki, dw = sparse_kl_bwd(dkl, qI, kI, w, idx, stat, pbuf)
        return None, None, None, None, None, dqi, dki, dw


def sparse_kl_triton(q, comp, idx, lse, scale: float, qI, kI, w):
    """The loss (0-d fp32): sum of the kept rows' KL / max(number of kept rows, 1), on the device."""
    kl, kept = SparseKLFn.apply(q.detach(), comp.detach(), idx, lse.detach(), scale, qI, kI, w)
    return kl.sum() / kept.sum().clamp_min(1.0)
