"""RMSNorm over the last dim (docs §0), the naive PyTorch twin of triton.py and the model's reference path.

    y = x / sqrt(mean(x^2) + eps) * w          x (..., D), w (D,) or None (RMSNorm_1, weightless)

Computed in fp32 (fp64 for fp64 x), returned in x's dtype. Autograd by PyTorch. dsv4_lab/layers.py (`RMSNorm`,
`rms_norm`) calls it through the dispatcher in __init__.py and the compressor pool's naive twin
(compressor_pool/naive.py) normalises its entries with it; kernels/ imports nothing from the model, so it lives here.
"""
from __future__ import annotations

import torch


def rms_norm_naive(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


__all__ = ["rms_norm_naive"]
