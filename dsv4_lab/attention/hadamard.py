"""Normalised Sylvester Walsh-Hadamard rotation of the indexer q and k (docs §2.4).

H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]; the rotation is x -> x H_n / sqrt(n). H_n / sqrt(n) is symmetric and
orthonormal, so (q H)(k H)^T = q k^T: the rotation only spreads outliers over all dims before the FP4 quantisation
(docs §8). n must be a power of two (config.validate checks index_head_dim).
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size n = {n} is not allowed: a power of two >= 1")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, n) normalised Sylvester Hadamard matrix H_n / sqrt(n)."""
    return _sylvester(n).to(dtype=dtype, device=device)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) -> x H_n / sqrt(n), in x's dtype (fp32 at least)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    return (x.to(ct) @ hadamard_matrix(x.shape[-1], ct, x.device)).to(x.dtype)
