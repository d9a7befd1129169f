"""mHC pre / post (docs §1.2), the naive PyTorch twin of triton.py and the model's reference path (mhc.py calls it).

Compute dtype: fp32 for bf16 / fp16 / fp32 inputs, fp64 when any input is fp64 (the tests' reference really runs in
fp64). Autograd by PyTorch.

pre:  x (B, T, n, d) -> v = vec(x), rho = 1 / sqrt(mean(v^2) + norm_eps)
      mu = rho * v W^T  ((2 + n) n mixes; layout [0:n] pre, [n:2n] post, [2n:] res row-major n x n)
      A = sigmoid(a0 mu_pre + base_pre) + eps;  C = 2 sigmoid(a1 mu_post + base_post)
      P = Sinkhorn(a2 Mat(mu_res) + base_res): softmax over j, + eps, column-normalise, then (iters - 1) x
          (row-normalise, column-normalise), each with + eps in the denominator
      u = sum_i A_i x_i   (cast to x's dtype)
post: x'_j = C_j y + sum_i P_ij x_i   (output stream j uses column j of P)

Shapes: fn ((2 + n) n, n d), scale (3,), base ((2 + n) n,). pre returns (u (B, T, d), coef (B, T, (2 + n) n) in the
compute dtype holding [A, C, P] in the mixes' layout); post takes y (B, T, d), x, coef and returns x' (B, T, n, d)
in x's dtype.
"""
from __future__ import annotations

import torch


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """(..., n, n) logits B~ -> P with columns summing to 1 (up to eps) and rows approximately 1 (docs §1.2 step 4).

    The reference order: P = softmax over the last index + eps, column-normalise, then (iters - 1) x
    (row-normalise, column-normalise): 20 row and 20 column normalisations at iters = 20 (the softmax is the first
    row normalisation), ending on columns."""
    P = (torch.softmax(logits, dim=-1) + eps).movedim((-2, -1), (0, 1)).contiguous()   # (n, n, ...): sums over
    P = P / (P.sum(dim=0, keepdim=True) + eps)                    # the outermost dims are adds of whole planes
    for _ in range(iters - 1):
        P = P / (P.sum(dim=1, keepdim=True) + eps)                # row-normalise (sum over j)
        P = P / (P.sum(dim=0, keepdim=True) + eps)                # column-normalise (sum over i)
    return P.movedim((0, 1), (-2, -1))                            # (..., n, n), a view


def mhc_maps_naive(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """(B, T, n, d) -> A (B, T, n), C (B, T, n), P (B, T, n, n) in the compute dtype."""
    B, T, n, d = x.shape
    ct = compute_dtype(x, fn, scale, base)
    v = x.to(ct).reshape(B, T, n * d)
    rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm_eps)
    with torch.autocast(x.device.type, enabled=False):         # fp32 under bf16 autocast too, as the kernels
        mu = (v @ fn.to(ct).t()) * rho                                           # (B, T, (2 + n) n)
    sc, bs = scale.to(ct), base.to(ct)
    A = torch.sigmoid(sc[0] * mu[..., :n] + bs[:n]) + eps
    C = 2 * torch.sigmoid(sc[1] * mu[..., n:2 * n] + bs[n:2 * n])
    P = sinkhorn((sc[2] * mu[..., 2 * n:] + bs[2 * n:]).unflatten(-1, (n, n)), iters, eps)
    return A, C, P


def mhc_coef_naive(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """(B, T, n, d) -> coef (B, T, (2 + n) n): [A (n), C (n), P (n x n row-major)]."""
    A, C, P = mhc_maps_naive(x, fn, scale, base, iters, eps, norm_eps)
    return torch.cat([A, C, P.flatten(-2)], -1)


def mhc_collapse_naive(x, coef):
    """u = sum_i A_i x_i (B, T, d) in x's dtype, A = coef[..., :n] (any [A, C, P] coef, also HC's tanh maps)."""
    n = x.shape[2]
    return (coef[..., :n, None] * x.to(coef.dtype)).sum(2).to(x.dtype)


def mhc_pre_naive(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    coef = mhc_coef_naive(x, fn, scale, base, iters, eps, norm_eps)
    return mhc_collapse_naive(x, coef), coef


def mhc_post_naive(y, x, coef):
    n = x.shape[2]
    ct = compute_dtype(y, x, coef)
    C = coef[..., n:2 * n].to(ct)
    P = coef[..., 2 * n:].unflatten(-1, (n, n)).to(ct)                           # (B, T, i, j)
    with torch.autocast(x.device.type, enabled=False):         # fp32 under bf16 autocast too (docs §1.2)
        out = C[..., None] * y.to(ct)[:, :, None] + torch.einsum("btij,btid->btjd", P, x.to(ct))
    return out.to(x.dtype)
