"""Token-level compressor pool + ape + RMSNorm_w (docs §2.3 overlapping, §3 plain), optionally + RoPE.

    compressor_pool(C, Z, ape, weight, eps, overlap, prev_C=None, prev_Z=None, impl="auto",
                    cos=None, sin=None, first_block=0)                                      -> (B, n, c)

C, Z (B, n, m, k c) projections of n complete blocks (k = 2 overlapping, 1 plain), Z without ape when `ape`
(m, k c) is given, with it when ape=None; weight (c,), eps: the RMSNorm's; prev_C, prev_Z (B, m, c) the b series
of the block before block 0 (overlap only; prev_Z including ape), None = -inf scores. cos, sin (max_len, r/2) the
rotary tables (RotaryTable.cos / .sin, docs §2.6) or None: entry i, of block first_block + i, is rotated on its last
r channels (interleaved pairs) at position (first_block + i) m; None returns the entries before RoPE. Output in C's
dtype.

The Triton kernels (triton.py, fp32) run when `impl` resolves to triton and C is fp32: with a gradient needed for C,
Z, ape or weight through CompressorPoolFn (the fused forward saving x and lse, and a fused backward: training), else
the forward kernel alone (inference, decode). prev_C, prev_Z, cos, sin get no gradient from the kernels: when one of
them needs one the naive twin runs. `takes_kernel` is the one statement of that rule. Otherwise the naive twin
(naive.py) runs under PyTorch autograd: fp64 references and the CPU path (impl auto / torch).
"""
from __future__ import annotations

import torch

from .. import resolve_impl
from .naive import compressor_pool_naive, pool_overlap, pool_plain, rms_norm_w


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def takes_kernel(impl: str, C, prev_C=None, prev_Z=None, cos=None, sin=None) -> bool:
    """True when compressor_pool(C, ..., impl=impl) runs the Triton kernels (forward, and backward when C, Z, ape or
    weight needs a gradient): impl resolves to triton for C, C is fp32 and none of prev_C, prev_Z, cos, sin (None
    allowed) needs a gradient, which the kernels do not compute. Under torch.compile with grad mode on the naive twin
    runs: Inductor fuses its elementwise chain, forward and backward."""
    return (resolve_impl(impl, C) == "triton" and C.dtype == torch.float32
            and not _needs_grad(prev_C, prev_Z, cos, sin)
            and not (torch.compiler.is_compiling() and torch.is_grad_enabled()))


def compressor_pool(C, Z, ape, weight, eps: float, overlap: bool, prev_C=None, prev_Z=None, impl: str = "auto",
                    cos=None, sin=None, first_block: int = 0):
    B, n, m, kc = C.shape
    if n == 0:
        return C.new_zeros(B, 0, kc // (2 if overlap else 1))
    if takes_kernel(impl, C, prev_C, prev_Z, cos, sin):
        from .triton import compressor_pool_triton
        return compressor_pool_triton(C, Z, ape, weight, eps, overlap, prev_C, prev_Z, cos=cos, sin=sin,
                                      first_block=first_block)
    return compressor_pool_naive(C, Z, ape, weight, eps, overlap, prev_C, prev_Z, cos, sin, first_block)


__all__ = ["compressor_pool", "compressor_pool_naive", "takes_kernel", "pool_overlap", "pool_plain", "rms_norm_w"]
