"""Fused mHC pre and post in Triton (same interface as naive.py; kernels.md §4, T8).

pre  (one program per BT tokens): pass 1 streams vec(x) once, accumulating sum(x^2) and the (2 + n) n mixes with
     one fp32 tl.dot (3-pass tf32, ~fp32 accuracy) against W; then rho, the static/dynamic affine, sigmoid, and the whole
     Sinkhorn (iters row/column normalisations) run in registers on a (BT, G, n) tile; pass 2 re-reads the BT
     tokens' streams (L2-hot) to form u = sum_i A_i x_i. Writes u (x's dtype) and coef (fp32, 24 per token).
post (one program per BT tokens x BD channels): x'_j = C_j y + sum_i P_ij x_i, reading x and y once.

Backward (autograd.Function): recompute-based. The backward re-runs the naive PyTorch twin under autograd on the
saved inputs and back-propagates through it (one extra forward in fp32; documented trade-off: no Triton backward
kernel for mHC yet).
"""
from __future__ import annotations

import torch

from .._common import check_device, next_pow2, tl, triton
from .naive import mhc_post_naive, mhc_pre_naive


@triton.jit
def _mhc_pre_kernel(X, FN, SC, BASE, U, COEF, NTOK, norm_eps, eps,
                    N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr,
                    ITERS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    NC: tl.constexpr = GP * NP
    ND: tl.constexpr = N * D
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < NTOK
    tok64 = tok.to(tl.int64)
    c = tl.arange(0, NC)
    cg = c // NP
    cj = c % NP
    cvalid = (cg < G) & (cj < N)
    wrow = cg * N + cj
    mix = tl.zeros([BT, NC], tl.float32)
    ss = tl.zeros([BT], tl.float32)
    for k0 in range(0, ND, BC):
        k = k0 + tl.arange(0, BC)
        kmask = k < ND
        xv = tl.load(X + tok64[:, None] * ND + k[None, :], mask=tmask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        wv = tl.load(FN + wrow[:, None] * ND + k[None, :], mask=cvalid[:, None] & kmask[None, :], other=0.0)
        ss += tl.sum(xv * xv, 1)
        mix += tl.dot(xv, tl.trans(wv.to(tl.float32)), input_precision="tf32x3")     # ~fp32 accuracy
    rho = 1.0 / tl.sqrt(ss / ND + norm_eps)
    a_c = tl.load(SC + tl.minimum(cg, 2))
    b_c = tl.load(BASE + wrow, mask=cvalid, other=0.0)
    z = mix * rho[:, None] * a_c[None, :] + b_c[None, :]
    z3 = tl.reshape(z, [BT, GP, NP])
    g3 = tl.reshape(cg, [1, GP, NP])
    j3 = tl.reshape(cj, [1, GP, NP])
    sig = 1.0 / (1.0 + tl.exp(-z3))
    res = (g3 >= 2) & (g3 < G) & (j3 < N)
    zr = tl.where(res, z3, float("-inf"))
    mx = tl.max(zr, 2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.where(res, tl.exp(z3 - mx[:, :, None]), 0.0)
    se = tl.sum(e, 2)
    se = tl.where(se == 0.0, 1.0, se)
    P = tl.where(res, e / se[:, :, None] + eps, 0.0)
    P = P / (tl.sum(P, 1)[:, None, :] + eps)
    for _ in range(ITERS - 1):
        P = P / (tl.sum(P, 2)[:, :, None] + eps)
        P = P / (tl.sum(P, 1)[:, None, :] + eps)
    coef = tl.where(g3 == 0, sig + eps, tl.where(g3 == 1, 2.0 * sig, P))
    cv3 = (g3 < G) & (j3 < N)
    tl.store(COEF + tok64[:, None, None] * (G * N) + g3 * N + j3, coef, mask=tmask[:, None, None] & cv3)
    A = tl.sum(tl.where(g3 == 0, coef, 0.0), 1)                                # (BT, NP)
    jj = tl.arange(0, NP)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dm = tmask[:, None] & (dd[None, :] < D)
        u = tl.zeros([BT, BD], tl.float32)
        for i in tl.static_range(N):
            a_i = tl.sum(tl.where(jj[None, :] == i, A, 0.0), 1)
            xi = tl.load(X + tok64[:, None] * ND + i * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
            u += a_i[:, None] * xi
        tl.store(U + tok64[:, None] * D + dd[None, :], u.to(U.dtype.element_ty), mask=dm)


@triton.jit
def _mhc_post_kernel(Y, X, COEF, OUT, NTOK,
                     N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr):
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < NTOK
    tok64 = tok.to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = tmask[:, None] & (dd[None, :] < D)
    jj = tl.arange(0, NP)
    jm = tmask[:, None] & (jj[None, :] < N)
    y = tl.load(Y + tok64[:, None] * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
    Cj = tl.load(COEF + tok64[:, None] * (G * N) + N + jj[None, :], mask=jm, other=0.0)
    out = Cj[:, :, None] * y[:, None, :]                                        # (BT, NP, BD)
    for i in tl.static_range(N):
        xi = tl.load(X + tok64[:, None] * (N * D) + i * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
        Pi = tl.load(COEF + tok64[:, None] * (G * N) + 2 * N + i * N + jj[None, :], mask=jm, other=0.0)
        out += Pi[:, :, None] * xi[:, None, :]
    j3 = jj[None, :, None]
    tl.store(OUT + tok64[:, None, None] * (N * D) + j3 * D + dd[None, None, :], out.to(OUT.dtype.element_ty),
             mask=dm[:, None, :] & (j3 < N))


def mhc_pre_fwd(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    check_device(x, fn)
    B, T, n, d = x.shape
    G = 2 + n
    assert fn.shape == (G * n, n * d), f"fn must be ({G * n}, {n * d}), got {tuple(fn.shape)}"
    xc = x.contiguous()
    ntok = B * T
    u = torch.empty(B, T, d, device=x.device, dtype=x.dtype)
    coef = torch.empty(B, T, G * n, device=x.device, dtype=torch.float32)
    BT = 64
    if ntok:
        _mhc_pre_kernel[(triton.cdiv(ntok, BT),)](
            xc, fn.float().contiguous(), scale.float().contiguous(), base.float().contiguous(), u, coef, ntok,
            norm_eps, eps, N=n, D=d, G=G, NP=next_pow2(n), GP=next_pow2(G), ITERS=iters, BT=BT,
            BC=64, BD=min(128, max(16, next_pow2(d))), num_warps=4)
    return u, coef


def mhc_post_fwd(y, x, coef):
    check_device(y, x, coef)
    B, T, n, d = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ntok = B * T
    BT, BD = 16, min(128, max(16, next_pow2(d)))
    if ntok:
        _mhc_post_kernel[(triton.cdiv(ntok, BT), triton.cdiv(d, BD))](
            y.contiguous(), x.contiguous(), coef.float().contiguous(), out, ntok,
            N=n, D=d, G=2 + n, NP=next_pow2(n), BT=BT, BD=BD, num_warps=4)
    return out


class MHCPreFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, scale, base, iters, eps, norm_eps):
        u, coef = mhc_pre_fwd(x, fn, scale, base, iters, eps, norm_eps)
        ctx.save_for_backward(x, fn, scale, base)
        ctx.cfg = (iters, eps, norm_eps)
        return u, coef

    @staticmethod
    def backward(ctx, du, dcoef):
        x, fn, scale, base = ctx.saved_tensors
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (x, fn, scale, base)]
            u, coef = mhc_pre_naive(*ins, *ctx.cfg)                      # recompute (see module docstring)
            outs, gouts = [], []
            for o, g in ((u, du), (coef, dcoef)):
                if g is not None:
                    outs.append(o)
                    gouts.append(g)
            grads = torch.autograd.grad(outs, ins, gouts, allow_unused=True)
        return (*grads, None, None, None)


class MHCPostFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, coef):
        ctx.save_for_backward(y, x, coef)
        return mhc_post_fwd(y, x, coef)

    @staticmethod
    def backward(ctx, dout):
        y, x, coef = ctx.saved_tensors
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (y, x, coef)]
            out = mhc_post_naive(*ins)
            return torch.autograd.grad(out, ins, dout, allow_unused=True)


def mhc_pre_triton(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    return MHCPreFn.apply(x, fn, scale, base, iters, eps, norm_eps)


def mhc_post_triton(y, x, coef):
    return MHCPostFn.apply(y, x, coef)
