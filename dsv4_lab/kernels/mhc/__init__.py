"""Fused mHC (docs §1.2): pre = RMS + (2 + n) n-way projection + sigmoid + Sinkhorn + pre-mix; post = post-mix +
residual mix.

    u, coef      = mhc_pre(x, fn, scale, base, iters=20, eps=1e-6, norm_eps=1e-6, impl="auto")
    u, coef, xa  = mhc_pre(..., alias=True)      # xa: x passed through, to give to mhc_post in place of x
    x_new        = mhc_post(y, x, coef, impl="auto")

x (B, T, n, d) residual streams; fn ((2 + n) n, n d) fp32; scale (3,) = (alpha_pre, alpha_post, alpha_res);
base ((2 + n) n,); u (B, T, d) in x's dtype; coef (B, T, (2 + n) n) fp32 = [A, C, P row-major]; y (B, T, d) the
sub-layer output. Differentiable in every float input: the Triton path has Triton backward kernels (triton.py); with
alias=True the post's gradient for x flows through xa into the pre backward kernel, which writes the sum of both
in one pass. The torch path is the naive twin (naive.py) under PyTorch autograd (there xa is x).
"""
from __future__ import annotations

from .. import resolve_impl
from .naive import mhc_coef_naive, mhc_collapse_naive, mhc_maps_naive, mhc_post_naive, mhc_pre_naive, sinkhorn


def mhc_pre(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6, impl: str = "auto",
            alias: bool = False):
    if resolve_impl(impl, x) == "triton":
        from .triton import mhc_pre_triton
        return mhc_pre_triton(x, fn, scale, base, iters, eps, norm_eps, alias=alias)
    u, coef = mhc_pre_naive(x, fn, scale, base, iters, eps, norm_eps)
    return (u, coef, x) if alias else (u, coef)


def mhc_post(y, x, coef, impl: str = "auto"):
    if resolve_impl(impl, x) == "triton":
        from .triton import mhc_post_triton
        return mhc_post_triton(y, x, coef)
    return mhc_post_naive(y, x, coef)


__all__ = ["mhc_pre", "mhc_post", "mhc_pre_naive", "mhc_post_naive", "mhc_coef_naive", "mhc_collapse_naive",
           "mhc_maps_naive", "sinkhorn"]
