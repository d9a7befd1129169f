"""Partial, interleaved rotary embeddings with optional YaRN (docs §2.6).

RoPE acts on the *last* `rope_head_dim` dims of a head; dims (2k, 2k+1) of that slice form the complex number
x_2k + i x_2k+1, rotated by exp(i * pos * theta_k), theta_k = base^(-2k/r). The same table serves queries, window
KV, compressed KV (at the position of the first token of their block) and the indexer of a layer. The attention
output is de-rotated with the conjugate rotation at the query position (`inverse=True`). The rotation itself is
kernels/rope's: `rope` (a fused Triton kernel on the kernel path, else the naive twin) and the naive `apply_rope` on
given cos / sin rows (shared with the compressor pool's naive twin), re-exported here.
"""
from __future__ import annotations

import math

import torch

from .kernels.rope import apply_rope, rope


def yarn_inv_freq(rope_dim: int, base: float, factor: float = 1.0, original_seq_len: int = 65536,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """(rope_dim/2,) fp32 inverse frequencies; YaRN when factor > 1 (docs §2.6, REF precompute_freqs_cis)."""
    inv = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim))
    if factor <= 1.0:
        return inv

    def corr_dim(beta):  # dimension index whose wavelength spans original_seq_len / beta rotations
        return rope_dim * math.log(original_seq_len / (beta * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    return inv * ((1 - ramp) + ramp / factor)


class RotaryTable(torch.nn.Module):
    """cos/sin of shape (max_len, rope_dim/2), fp32, built as HF/REF do: fp32(pos) * fp32(inv_freq)."""

    def __init__(self, rope_dim: int, max_len: int, base: float, yarn: dict | None = None, impl: str = "auto"):
        super().__init__()
        self.rope_dim = rope_dim
        self.impl = impl                        # cfg.kernels: the fused rotation (kernels/rope) or its naive twin
        inv = yarn_inv_freq(rope_dim, base, **(yarn or {})) if rope_dim else torch.zeros(0)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (max_len, r/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the last `rope_dim` dims of x (..., T, [H,] D) at integer positions pos (T,) or (B, T)."""
        return rope(x, self.cos, self.sin, pos, inverse, impl=self.impl)


__all__ = ["RotaryTable", "apply_rope", "yarn_inv_freq"]
