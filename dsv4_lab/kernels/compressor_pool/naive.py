"""Token-level compressor pool + RMSNorm_w (+ RoPE) (docs §2.3, §3), the naive PyTorch twin of triton.py and the
model's reference path (attention/compressor.py calls it through the dispatcher in __init__.py).

Shapes: C, Z (B, n, m, k c) values and scores of n complete blocks of m tokens (k = 2 overlapping, 1 plain);
ape (m, k c) or None (None = Z already includes it); weight (c,) the RMSNorm weight; prev_C, prev_Z (B, m, c) the
b-series rows of the block before block 0 (decode cache, prev_Z including ape) or None (b slots of entry 0 score
-inf, value 0). Output (B, n, c) in C's dtype. Compute dtype: C's (fp32 in the model, fp64 in the tests' references);
the RMSNorm in fp32, or fp64 for fp64 input. Autograd by PyTorch. Optional RoPE: cos, sin (max_len, r/2) the rotary
tables, first_block an int: entry i (block first_block + i) is rotated on its last r channels at position
(first_block + i) m by kernels/rope's naive `apply_rope` (cos / sin None: the entries are returned before RoPE).
"""
from __future__ import annotations

import torch

from ..rmsnorm.naive import rms_norm_naive
from ..rope import apply_rope


def pool_overlap(C: torch.Tensor, Z: torch.Tensor, prev_C: torch.Tensor | None = None,
                 prev_Z: torch.Tensor | None = None) -> torch.Tensor:
    """Overlapping 2m-slot per-channel softmax pool (docs §2.3).

    C, Z: (B, n, m, 2c) values and scores of n complete blocks, Z already including `ape`.
    prev_C, prev_Z: (B, m, c) the b-series rows of the block before block 0 (decode cache); None = -inf / 0.
    Returns (B, n, c) pooled entries before the RMSNorm.
    """
    B, n, m, c2 = C.shape
    c = c2 // 2
    Cb, Ca = C[..., :c], C[..., c:]                                   # b feeds entry i+1, a feeds entry i
    Zb, Za = Z[..., :c], Z[..., c:]
    if prev_C is None:
        prev_C = C.new_zeros(B, 1, m, c)
        prev_Z = Z.new_full((B, 1, m, c), float("-inf"))
    else:
        prev_C, prev_Z = prev_C[:, None].to(C.dtype), prev_Z[:, None].to(Z.dtype)
    Cb = torch.cat([prev_C, Cb[:, :-1]], 1)                           # (B, n, m, c): block i-1's b series
    Zb = torch.cat([prev_Z, Zb[:, :-1]], 1)
    slots_C = torch.cat([Cb, Ca], 2)                                  # (B, n, 2m, c)
    slots_Z = torch.cat([Zb, Za], 2)
    w = torch.softmax(slots_Z, dim=2)                                 # per channel over the 2m slots
    return (w * slots_C).sum(2)


def pool_plain(C: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Non-overlapping m-slot per-channel softmax pool (docs §3). C, Z: (B, n, m, c), Z incl. ape -> (B, n, c)."""
    return (torch.softmax(Z, dim=2) * C).sum(2)


def rms_norm_w(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32 (fp64 for fp64 x), returned in x's dtype:
    kernels/rmsnorm's naive twin, the model's RMSNorm (dsv4_lab.layers) on its torch path."""
    return rms_norm_naive(x, weight, eps)


def compressor_pool_naive(C: torch.Tensor, Z: torch.Tensor, ape: torch.Tensor | None, weight: torch.Tensor,
                          eps: float, overlap: bool, prev_C: torch.Tensor | None = None,
                          prev_Z: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                          sin: torch.Tensor | None = None, first_block: int = 0) -> torch.Tensor:
    """(B, n, m, k c) projections -> (B, n, c) entries RMSNorm_w(pool(C, Z + ape)) (docs §2.3, §3), then RoPE at
    position (first_block + i) m of entry i when cos / sin are given."""
    if ape is not None:
        Z = Z + ape.to(Z.dtype)
    if overlap:
        pooled = pool_overlap(C, Z, prev_C, prev_Z)
    else:
        if prev_C is not None:
            raise ValueError("prev_C / prev_Z are only used by the overlapping pool")
        pooled = pool_plain(C, Z)
    y = rms_norm_w(pooled, weight, eps)
    if cos is None:
        return y
    pos = (torch.arange(C.shape[1], device=C.device) + first_block) * C.shape[2]     # (n,) first token of the block
    return apply_rope(y, cos[pos], sin[pos])
