"""Lightning-indexer scores + top-k (docs §2.4), forward only (selection is non-differentiable).

    indexer_topk(qI, kI, w, k, ratio, q_offset=0, impl="auto", return_scores=False, score_dtype="fp32")

qI (B, T, HI, DI) indexer queries at positions q_offset..; kI (B, S, DI) compressed indexer keys (or MXFP4Keys:
packed MXFP4, as the paper caches them; naive.py); w (B, T, HI) head
weights (scaling included). Returns idx (B, T, k) int32, -1 where fewer than k entries are visible (entry s visible
to position t iff s < floor((t + 1) / ratio)). impl="torch" (the naive twin): sorted by score, lower index first
among ties. impl="triton" runs indexer_topk_triton(method="auto"): triton.AUTO picks the fp32-score method measured
fastest on the H200 for prefill ("sieve": Triton scores + the sieve select of sieve.py; the row select "rowsel" for
query chunks that see at most triton.AUTO_SHORT_L entries) and for decode, T <= triton.DECODE_T
("select": Triton scores + the split-row radix select of select.py). All return the naive twin's picks as a set,
with its tie rule (lower index first among entries tied at the k-th value; deterministic); the torch methods
(torch.topk) up to which of the tied entries is taken (triton.py docstring); without return_scores the set comes
unsorted, so a row's -1 slots may sit anywhere in it (every consumer masks them per slot).
The model's other selectors (attention/csa.py: oracle, random) use `topk_indices`, the naive twin's top-k contract.
The bf16-score methods (select_bf16, torch_bf16, rowsel_bf16, sieve_bf16: scores rounded to bf16 before the
selection, docs §2.4) are what score_dtype="bf16" runs (triton: method "auto_bf16"; the naive twin rounds its fp32
scores once).
The variants that lost to these on the H200 were removed: benchmarks/README.md.
"""
from __future__ import annotations

import torch

from .. import resolve_impl
from .naive import MXFP4Keys, index_scores, indexer_scores, indexer_topk_naive, mxfp4_key_values, topk_indices, visible


@torch.no_grad()
def indexer_topk(qI, kI, w, k: int, ratio: int, q_offset: int = 0, impl: str = "auto", return_scores: bool = False,
                 score_dtype: str = "fp32"):
    if score_dtype not in ("fp32", "bf16"):
        raise ValueError(f"score_dtype={score_dtype!r}: allowed are 'fp32', 'bf16'")
    if resolve_impl(impl, qI) == "triton":
        from .triton import indexer_topk_triton
        return indexer_topk_triton(qI, kI, w, k, ratio, q_offset, return_scores,
                                   method="auto_bf16" if score_dtype == "bf16" else "auto")
    return indexer_topk_naive(qI, kI, w, k, ratio, q_offset, return_scores=return_scores, score_dtype=score_dtype)


__all__ = ["indexer_topk", "indexer_topk_naive", "indexer_scores", "index_scores", "topk_indices", "visible",
           "MXFP4Keys", "mxfp4_key_values"]
