"""mHC pre / post (docs §1.2), naive PyTorch twin of triton.py. Everything in fp32.

pre:  x (B, T, n, d) -> v = vec(x), rho = 1 / sqrt(mean(v^2) + norm_eps)
      mu = rho * v W^T  (24 = (2 + n) n mixes; layout [0:n] pre, [n:2n] post, [2n:] res row-major n x n)
      A = sigmoid(a0 mu_pre + base_pre) + eps;  C = 2 sigmoid(a1 mu_post + base_post)
      P = Sinkhorn(a2 Mat(mu_res) + base_res): softmax over j, + eps, column-normalise, then (iters - 1) x
          (row-normalise, column-normalise), each with + eps in the denominator
      u = sum_i A_i x_i   (cast to x's dtype)
post: x'_j = C_j y + sum_i P_ij x_i   (output stream j uses column j of P)

Shapes: fn (24, n*d) fp32, scale (3,), base (24,). pre returns (u (B, T, d), coef (B, T, (2 + n) n) fp32 holding
[A, C, P] in the mixes' layout); post takes y (B, T, d), x, coef and returns x' (B, T, n, d) in x's dtype.
"""
from __future__ import annotations

import torch


def mhc_coef_naive(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """(B, T, n, d) -> coef (B, T, (2 + n) n) fp32: [A (n), C (n), P (n x n row-major)]."""
    B, T, n, d = x.shape
    v = x.float().reshape(B, T, n * d)
    rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm_eps)
    mu = (v @ fn.float().t()) * rho                                              # (B, T, (2 + n) n)
    sc = scale.float()
    bs = base.float()
    A = torch.sigmoid(sc[0] * mu[..., :n] + bs[:n]) + eps
    C = 2 * torch.sigmoid(sc[1] * mu[..., n:2 * n] + bs[n:2 * n])
    z = (sc[2] * mu[..., 2 * n:] + bs[2 * n:]).view(B, T, n, n)
    P = torch.softmax(z, -1) + eps
    P = P / (P.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        P = P / (P.sum(-1, keepdim=True) + eps)
        P = P / (P.sum(-2, keepdim=True) + eps)
    return torch.cat([A, C, P.flatten(-2)], -1)


def mhc_pre_naive(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    n = x.shape[2]
    coef = mhc_coef_naive(x, fn, scale, base, iters, eps, norm_eps)
    u = (coef[..., :n, None] * x.float()).sum(2).to(x.dtype)                    # (B, T, d)
    return u, coef


def mhc_post_naive(y, x, coef):
    n = x.shape[2]
    C = coef[..., n:2 * n]
    P = coef[..., 2 * n:].unflatten(-1, (n, n))                                  # (B, T, i, j)
    out = C[..., None] * y.float()[:, :, None] + torch.einsum("btij,btid->btjd", P, x.float())
    return out.to(x.dtype)
