"""Interleaved partial RoPE on given cos / sin rows (docs §2.6): the one PyTorch implementation of the rotation, the
naive twin of triton.py.

dsv4_lab/rope.py (`RotaryTable`, the model's tables) calls it through the dispatcher in __init__.py, and the
compressor pool's naive twin (compressor_pool/naive.py) rotates its entries with it; kernels/ imports nothing from the
model, so it lives here.
"""
from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x: (B, T, D) or (B, T, H, D); cos/sin: (T, r/2) or (B, T, r/2). Interleaved pairs on the last r dims."""
    r = cos.shape[-1] * 2
    if r == 0:
        return x
    if x.dim() == 4:                       # broadcast over heads
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    nope, rope = x[..., :-r], x[..., -r:]
    ct = torch.promote_types(x.dtype, torch.float32)         # fp32 at least; fp64 stays fp64 (tests)
    cos, sin = cos.to(ct), sin.to(ct)
    xr = rope.to(ct).unflatten(-1, (r // 2, 2))              # (..., r/2, 2)
    if torch.compiler.is_compiling():                        # real form: Inductor fuses it (it has no complex dtype)
        x0, x1 = xr[..., 0], xr[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:                                                    # the same products as one complex multiply (eager:
        z = torch.view_as_complex(xr.contiguous())           # one kernel forward and backward, 2-3x faster on CPU)
        out = torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2)
    return torch.cat((nope, out.to(x.dtype)), dim=-1)


__all__ = ["apply_rope"]
