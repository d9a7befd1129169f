"""Lightning-indexer scores + top-k, naive PyTorch twin of triton.py (docs §2.4; docs/kernels.md §3). Forward only.

    I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . kI[s])          (w already holds the 1/sqrt(c^I n^I_h) factors)
    entry s is a candidate for the query at position t = q_offset + i iff s < floor((t + 1) / ratio)
    idx[t] = the k candidates with the largest I[t, s], sorted by score (descending); ties go to the LOWER index
             (declared tie rule, docs/kernels.md §9.1); slots beyond the number of candidates are -1.

This file is the model's one statement of the index score (`index_scores`), of visibility (`visible`) and of the
top-k contract (`topk_indices`: int32, sorted, lower index first among ties, -1 for invisible / missing); the
attention's other selectors (oracle, random: attention/csa.py) go through `topk_indices` too.

Shapes: qI (B, T, HI, DI); kI (B, S, DI); w (B, T, HI). Returns idx (B, T, k) int32 (and the scores of the picks,
fp32, -inf for -1 slots, when return_scores). Queries are processed `chunk` at a time, so the [T, S] score matrix
exists for `chunk` rows only (the dense matrix is never written at long T). Scores are computed in fp32 (fp64 for
fp64 inputs).
"""
from __future__ import annotations

import torch


def visible(t: torch.Tensor, S: int, ratio: int) -> torch.Tensor:
    """(T, S) bool: entry s is visible to the query at absolute position t iff s < floor((t + 1) / ratio)."""
    return torch.arange(S, device=t.device)[None, :] < torch.div(t[:, None] + 1, ratio, rounding_mode="floor")


def index_scores(qI: torch.Tensor, kI: torch.Tensor, w: torch.Tensor, ct: torch.dtype | None = None) -> torch.Tensor:
    """I_{t,s} = sum_h w_{t,h} ReLU(qI_{t,h} . kI_s): qI (B, T, HI, DI), w (B, T, HI) and kI (B, S, DI) keys shared by
    every query, or (B, T, S, DI) keys gathered per query (the KL over picks: kernels/sparse_kl) -> (B, T, S), no
    mask. Computed in ct (default fp32, fp64 for fp64 inputs)."""
    ct = ct or torch.promote_types(qI.dtype, torch.float32)
    pattern = "bthd,bsd->bths" if kI.dim() == 3 else "bthd,btsd->bths"
    logits = torch.einsum(pattern, qI.to(ct), kI.to(ct)).relu()                        # (B, T, HI, S)
    return torch.einsum("bths,bth->bts", logits, w.to(ct))


def indexer_scores(qI, kI, w, ratio: int, q_offset: int = 0, t0: int = 0, t1: int | None = None):
    """(B, t1 - t0, S) scores of query rows t0..t1-1 with invisible entries at -inf."""
    t1 = qI.shape[1] if t1 is None else t1
    sc = index_scores(qI[:, t0:t1], kI, w[:, t0:t1])
    t = torch.arange(t0, t1, device=qI.device) + q_offset
    return sc.masked_fill(~visible(t, kI.shape[1], ratio)[None], float("-inf"))


def topk_indices(scores: torch.Tensor, k: int, return_scores: bool = False, use_topk: bool = False):
    """The top-k contract: scores (B, T, S) with -inf = not a candidate -> idx (B, T, k) int32 sorted by score
    (descending), ties to the lower index, -1 for slots without a candidate (also every slot past S). use_topk=True
    takes torch.topk (faster, ties unspecified) instead of the stable sort. Consumers treat a row as a set (each slot
    masked on its own): the Triton methods return it unsorted, in torch.topk(sorted=False) order (prefill; ties
    unspecified) or in select's fixed slot order (decode; the same tie rule: triton.py, select.py)."""
    B, T, S = scores.shape
    kk = min(k, S)
    idx = torch.full((B, T, k), -1, dtype=torch.int32, device=scores.device)
    val = torch.full((B, T, k), float("-inf"), dtype=torch.float32, device=scores.device)
    if kk > 0:
        if use_topk:
            v, i = torch.topk(scores, kk, dim=-1)
        else:
            v, i = torch.sort(scores, dim=-1, descending=True, stable=True)
            v, i = v[..., :kk], i[..., :kk]
        idx[..., :kk] = torch.where(v == float("-inf"), -1, i).to(torch.int32)
        val[..., :kk] = v.float()
    return (idx, val) if return_scores else idx


def indexer_topk_naive(qI, kI, w, k: int, ratio: int, q_offset: int = 0, chunk: int = 1024,
                       return_scores: bool = False, use_topk: bool = False, score_dtype: str = "fp32"):
    """score_dtype "bf16": the fp32 scores rounded once to bf16 before the top-k (ties to the lower index)."""
    B, T = qI.shape[:2]
    idx = torch.full((B, T, k), -1, dtype=torch.int32, device=qI.device)
    val = torch.full((B, T, k), float("-inf"), dtype=torch.float32, device=qI.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        sc = indexer_scores(qI, kI, w, ratio, q_offset, t0, t1)
        if score_dtype == "bf16":
            sc = sc.to(torch.bfloat16).float()
        idx[:, t0:t1], val[:, t0:t1] = topk_indices(sc, k, return_scores=True, use_topk=use_topk)
    return (idx, val) if return_scores else idx
