"""Lightning-indexer scores + top-k (docs §2.4), forward only (selection is non-differentiable).

    indexer_topk(qI, kI, w, k, ratio, q_offset=0, impl="auto", return_scores=False)

qI (B, T, HI, DI) indexer queries at positions q_offset..; kI (B, S, DI) compressed indexer keys; w (B, T, HI) head
weights (scaling included). Returns idx (B, T, k) int32, sorted by score, lower index first among ties, -1 where
fewer than k entries are visible (entry s visible to position t iff s < floor((t + 1) / ratio)).
impl="triton" runs indexer_topk_triton(method="auto"): triton.AUTO picks the method for prefill and for decode
(T <= triton.DECODE_T); its "radix" methods keep the lower-index tie rule exactly, the torch.topk-based ones
("torch", "split_torch") may order equal scores differently (triton.py docstring). Default (measured fastest on
the H200): "torch", i.e. Triton scores + torch.topk, which without return_scores returns the same set of picks in
torch.topk(sorted=False) order, so its -1 slots may sit anywhere in a row (every consumer masks them per slot).
The model's other selectors (attention/csa.py: oracle, random) use `topk_indices`, the naive twin's top-k contract.
Candidate methods not yet measured on the GPU: gmax / gmax_bf16 (gmax_select.py, prefill) and select / select_bf16
(select.py, split-row radix select for decode), bf16 = scores rounded to bf16 before the selection (docs §2.4).
"""
from __future__ import annotations

import torch

from .. import resolve_impl
from .naive import index_scores, indexer_scores, indexer_topk_naive, topk_indices, visible


@torch.no_grad()
def indexer_topk(qI, kI, w, k: int, ratio: int, q_offset: int = 0, impl: str = "auto", return_scores: bool = False):
    if resolve_impl(impl, qI) == "triton":
        from .triton import indexer_topk_triton
        return indexer_topk_triton(qI, kI, w, k, ratio, q_offset, return_scores)
    return indexer_topk_naive(qI, kI, w, k, ratio, q_offset, return_scores=return_scores)


__all__ = ["indexer_topk", "indexer_topk_naive", "indexer_scores", "index_scores", "topk_indices", "visible"]
