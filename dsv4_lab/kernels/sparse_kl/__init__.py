"""Indexer KL loss over the attended compressed entries (docs §10): the top-k picks in the "sparse" stage, every
visible entry in the "warmup" stage (attention/attention.py calls it with the attention's lse).

    sparse_kl(q, comp, idx, lse, scale, qI, kI, w, impl="auto")

q (B, T, H, c) main queries; comp (B, S, c) compressed entries; idx (B, T, K) picks (-1 / out of range = none);
lse (B, T, H) the main softmax's log-normaliser; qI (B, T, n_I, c_I), kI (B, S, c_I), w (B, T, n_I) the indexer's
tensors. Returns the 0-d fp32 loss (mean KL over rows whose target is not all zero), differentiable w.r.t. qI, kI, w.
"""
from __future__ import annotations

from .. import resolve_impl
from .naive import sparse_kl_naive


def sparse_kl(q, comp, idx, lse, scale: float, qI, kI, w, impl: str = "auto"):
    if resolve_impl(impl, q) == "triton":
        from .triton import sparse_kl_triton
        return sparse_kl_triton(q, comp, idx, lse, scale, qI, kI, w)
    return sparse_kl_naive(q, comp, idx, lse, scale, qI, kI, w)


__all__ = ["sparse_kl", "sparse_kl_naive"]
