"""Lightning-indexer scores + top-k, naive PyTorch twin of triton.py (docs §2.4; docs/kernels.md §3). Forward only.

    I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . kI[s])          (w already holds the 1/sqrt(c^I n^I_h) factors)
    entry s is a candidate for the query at position t = q_offset + i iff s < floor((t + 1) / ratio)
    idx[t] = the k candidates with the largest I[t, s], sorted by score (descending); ties go to the LOWER index
             (declared tie rule, docs/kernels.md §9.1); slots beyond the number of candidates are -1.

Shapes: qI (B, T, HI, DI); kI (B, S, DI); w (B, T, HI). Returns idx (B, T, k) int32 (and the scores of the picks,
fp32, -inf for -1 slots, when return_scores). Queries are processed `chunk` at a time, so the [T, S] score matrix
exists for `chunk` rows only (the dense matrix is never written at long T).
"""
from __future__ import annotations

import torch


def indexer_scores(qI, kI, w, ratio: int, q_offset: int = 0, t0: int = 0, t1: int | None = None):
    """(B, t1 - t0, S) fp32 scores with invisible entries at -inf."""
    t1 = qI.shape[1] if t1 is None else t1
    S = kI.shape[1]
    logits = torch.einsum("bthd,bsd->bths", qI[:, t0:t1].float(), kI.float()).relu_()   # (B, Tq, HI, S)
    sc = torch.einsum("bths,bth->bts", logits, w[:, t0:t1].float())
    t = torch.arange(t0, t1, device=qI.device) + q_offset
    vis = torch.arange(S, device=qI.device)[None, :] < ((t + 1) // ratio)[:, None]
    return sc.masked_fill(~vis[None], float("-inf"))


def indexer_topk_naive(qI, kI, w, k: int, ratio: int, q_offset: int = 0, chunk: int = 1024,
                       return_scores: bool = False, use_topk: bool = False):
    """use_topk=True takes torch.topk (faster, ties unspecified) instead of the stable sort (the tie rule)."""
    B, T = qI.shape[:2]
    S = kI.shape[1]
    kk = min(k, S)
    idx = torch.full((B, T, k), -1, dtype=torch.int32, device=qI.device)
    val = torch.full((B, T, k), float("-inf"), dtype=torch.float32, device=qI.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        sc = indexer_scores(qI, kI, w, ratio, q_offset, t0, t1)
        if kk == 0:
            continue
        if use_topk:
            v, i = torch.topk(sc, kk, dim=-1)
        else:
            v, i = torch.sort(sc, dim=-1, descending=True, stable=True)
            v, i = v[..., :kk], i[..., :kk]
        i = torch.where(v == float("-inf"), -1, i)
        idx[:, t0:t1, :kk] = i.to(torch.int32)
        val[:, t0:t1, :kk] = v
    return (idx, val) if return_scores else idx
