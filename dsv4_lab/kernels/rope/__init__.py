"""Interleaved partial RoPE (docs §2.6): the rotation of the last r dims of every row at the row's position.

    rope(x, cos, sin, pos, inverse=False, impl="auto")   x (B, T, [H,] D), tables (max_len, r/2), pos (T,) or (B, T)
    apply_rope(x, cos_rows, sin_rows, inverse=False)     the naive twin on table rows already gathered at pos

Triton (triton.py: one launch forward, one backward) when impl resolves to triton for x, x is not fp64 and
torch.compile is not tracing (Inductor fuses the naive twin's real form itself); otherwise the naive twin.
"""
from __future__ import annotations

import torch

from .. import eager_triton
from .naive import apply_rope


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, inverse: bool = False,
         impl: str = "auto") -> torch.Tensor:
    if cos.shape[-1] > 0 and x.dim() in (3, 4) and eager_triton(impl, x):
        from .triton import rope_triton
        return rope_triton(x, cos, sin, pos, inverse)
    return apply_rope(x, cos[pos], sin[pos], inverse)


__all__ = ["rope", "apply_rope"]
