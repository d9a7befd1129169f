"""The clamped SwiGLU activation of the dense FFN, the shared and the routed experts (docs §5.3).

    swiglu(gate, up, limit=0.0, weight=None, out_dtype=None, impl="auto")        -> (..., I) in out_dtype
    swiglu_packed(h, limit=0.0, weight=None, out_dtype=None, impl="auto")        h (..., 2I) = [gate | up]
    h = SiLU(clamp(gate, max=L)) * clamp(up, -L, L) * weight, in fp32 (fp64 for fp64 inputs); L = 0: no clamp;
    weight (..., 1) one routing weight per row (applied before W2) or None.

Triton (triton.py: one fused launch forward, one backward) when impl resolves to triton for the tensor, the inputs
are not fp64 and torch.compile is not tracing (Inductor fuses the naive twin's elementwise chain itself); otherwise
the naive twin (naive.py) under autograd. swiglu_packed takes gate and up as the two halves of one tensor (the
output of a [W1; W3] GEMM): the same values, and its Triton backward writes the (..., 2I) gradient in place of a
dgate, dup pair that chunk's backward would concatenate.
"""
from __future__ import annotations

import torch

from .. import eager_triton
from .naive import swiglu_naive


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0, weight: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, impl: str = "auto") -> torch.Tensor:
    if eager_triton(impl, gate):
        from .triton import swiglu_triton
        return swiglu_triton(gate, up, limit, weight, out_dtype)
    return swiglu_naive(gate, up, limit, weight, out_dtype)


def swiglu_packed(h: torch.Tensor, limit: float = 0.0, weight: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, impl: str = "auto") -> torch.Tensor:
    if eager_triton(impl, h):
        from .triton import swiglu_triton_packed
        return swiglu_triton_packed(h, limit, weight, out_dtype)
    gate, up = h.chunk(2, dim=-1)
    return swiglu_naive(gate, up, limit, weight, out_dtype)


__all__ = ["swiglu", "swiglu_naive", "swiglu_packed"]
