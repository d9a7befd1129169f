"""Normalised Sylvester Walsh-Hadamard rotation of the indexer q and k (docs §2.4).

H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]; the rotation is x -> x H_n / sqrt(n). H_n / sqrt(n) is symmetric and
orthonormal, so (q H)(k H)^T = q k^T: the rotation only spreads outliers over all dims before the FP4 quantisation
(docs §8). n must be a power of two (config.validate checks index_head_dim).

The matrix is built in the requested dtype: entries +-1 (exact in any float type) times the Python float
1/sqrt(n), i.e. 1/sqrt(n) rounded once to fp64 and then to the dtype. Eager calls reuse a cached copy per
(n, dtype, device); under torch.compile it is built inline (no cache lookup and no fp64 tensor in the graph, which
the compiler folds into a constant).
"""
from __future__ import annotations

import functools
import math

import torch


def _sylvester(n: int, dtype, device) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size n = {n} is not allowed: a power of two >= 1")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * (1.0 / math.sqrt(n))


_sylvester_cached = functools.lru_cache(maxsize=None)(_sylvester)


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, n) normalised Sylvester Hadamard matrix H_n / sqrt(n)."""
    if torch.compiler.is_compiling():
        return _sylvester(n, dtype, device)
    return _sylvester_cached(n, dtype, torch.device(device) if device is not None else None)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) -> x H_n / sqrt(n), in x's dtype (fp32 at least)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    return (x.to(ct) @ hadamard_matrix(x.shape[-1], ct, x.device)).to(x.dtype)
