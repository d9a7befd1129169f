"""Token-level compressor pool + ape + RMSNorm_w (docs §2.3 overlapping, §3 plain), before RoPE.

    compressor_pool(C, Z, ape, weight, eps, overlap, prev_C=None, prev_Z=None, impl="auto")   -> (B, n, c)

C, Z (B, n, m, k c) projections of n complete blocks (k = 2 overlapping, 1 plain), Z without ape when `ape`
(m, k c) is given, with it when ape=None; weight (c,), eps: the RMSNorm's; prev_C, prev_Z (B, m, c) the b series
of the block before block 0 (overlap only; prev_Z including ape), None = -inf scores. Output in C's dtype.

The Triton kernel (triton.py) is forward-only and fp32: it runs when `impl` resolves to triton, C is fp32 and no
gradient is needed (grad mode off, or no input requires grad). Otherwise the naive twin (naive.py) runs under
PyTorch autograd: training, fp64 references, and the CPU path.
"""
from __future__ import annotations

import torch

from .. import resolve_impl
from .naive import compressor_pool_naive, pool_overlap, pool_plain, rms_norm_w


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def compressor_pool(C, Z, ape, weight, eps: float, overlap: bool, prev_C=None, prev_Z=None, impl: str = "auto"):
    B, n, m, kc = C.shape
    if n == 0:
        return C.new_zeros(B, 0, kc // (2 if overlap else 1))
    if (resolve_impl(impl, C) == "triton" and C.dtype == torch.float32
            and not _needs_grad(C, Z, ape, weight, prev_C, prev_Z)):
        from .triton import compressor_pool_triton
        return compressor_pool_triton(C, Z, ape, weight, eps, overlap, prev_C, prev_Z)
    return compressor_pool_naive(C, Z, ape, weight, eps, overlap, prev_C, prev_Z)


__all__ = ["compressor_pool", "compressor_pool_naive", "pool_overlap", "pool_plain", "rms_norm_w"]
