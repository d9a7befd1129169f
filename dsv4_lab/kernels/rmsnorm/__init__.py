"""RMSNorm over the last dim (docs §0): every norm of the model (block attn_norm / ffn_norm, attention q_norm /
kv_norm and the per-head weightless norm of the queries, MTP's norms, the final norm).

    rms_norm(x, weight, eps, impl="auto") -> (..., D) in x's dtype
    y = x / sqrt(mean(x^2) + eps) * weight, in fp32 (fp64 for fp64 x); weight (D,) or None (RMSNorm_1)

Triton (triton.py: one fused launch forward, one backward) when impl resolves to triton for x, x is not fp64,
torch.compile is not tracing (Inductor fuses the naive twin itself) and D <= triton.MAX_D (a row is held in
registers); otherwise the naive twin (naive.py) under autograd.
"""
from __future__ import annotations

import torch

from .. import eager_triton
from .naive import rms_norm_naive


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, impl: str = "auto") -> torch.Tensor:
    if eager_triton(impl, x):
        from .triton import MAX_D, rms_norm_triton
        if x.shape[-1] <= MAX_D:
            return rms_norm_triton(x, weight, eps)
    return rms_norm_naive(x, weight, eps)


__all__ = ["rms_norm", "rms_norm_naive"]
