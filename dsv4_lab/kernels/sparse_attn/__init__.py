"""CSA core attention: window + top-k selected compressed entries + sink in one softmax (docs §2.5).

    sparse_attn(q, kv, comp, idx, sink, scale, window, q_offset=0, impl="auto", return_lse=False)

q (B, T, H, D) queries at absolute positions q_offset..q_offset+T-1; kv (B, Tk, D) uncompressed K = V entries at
positions 0..Tk-1 (window source); comp (B, S, D) compressed entries; idx (B, T, K) int indices into comp (-1 or
out of range = masked; the indexer already turns invisible picks into -1); sink (H,) or None; scale = 1/sqrt(c).
Returns o (B, T, H, D) (and lse (B, T, H) fp32). Differentiable w.r.t. q, kv, comp, sink (not idx).
"""
from __future__ import annotations

from .. import resolve_impl
from .naive import sparse_attn_naive


def sparse_attn(q, kv, comp, idx, sink, scale: float, window: int, q_offset: int = 0, impl: str = "auto",
                return_lse: bool = False):
    if resolve_impl(impl, q) == "triton":
        from .triton import sparse_attn_triton
        return sparse_attn_triton(q, kv, comp, idx, sink, scale, window, q_offset, return_lse)
    return sparse_attn_naive(q, kv, comp, idx, sink, scale, window, q_offset, return_lse=return_lse)


__all__ = ["sparse_attn", "sparse_attn_naive"]
