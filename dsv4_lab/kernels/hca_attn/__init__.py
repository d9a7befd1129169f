"""HCA core attention: all block-causally visible compressed entries + window + sink in one softmax (docs §3).

    hca_attn(q, kv, comp, sink, scale, window, ratio, q_offset=0, impl="auto", return_lse=False, kv_start=0)

q (B, T, H, D) queries at positions q_offset..q_offset+T-1; kv (B, Tk, D) uncompressed K = V entries at positions
kv_start..kv_start+Tk-1 (window source; a decode cache passes the window it keeps, kv_start > 0); comp (B, S, D) compressed entries (entry s visible to position t iff s < floor((t + 1) / ratio));
sink (H,) or None; scale = 1/sqrt(c). Returns o (B, T, H, D) (and lse (B, T, H) fp32).
Differentiable w.r.t. q, kv, comp, sink.
"""
from __future__ import annotations

from .. import resolve_impl
from .naive import hca_attn_naive


def hca_attn(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0, impl: str = "auto",
             return_lse: bool = False, kv_start: int = 0):
    if resolve_impl(impl, q) == "triton":
        from .triton import hca_attn_triton
        return hca_attn_triton(q, kv, comp, sink, scale, window, ratio, q_offset, return_lse, kv_start)
    return hca_attn_naive(q, kv, comp, sink, scale, window, ratio, q_offset, return_lse=return_lse,
                          kv_start=kv_start)


__all__ = ["hca_attn", "hca_attn_naive"]
