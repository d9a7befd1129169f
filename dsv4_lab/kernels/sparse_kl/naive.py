"""Indexer KL loss over the attended compressed entries, naive PyTorch twin of triton.py (docs §10, V3.2 recipe).

For query row (b, t) with picks s_k = idx[b, t, k], k < K (valid iff 0 <= s_k < S; -1 = none):
    p_k = sum_h exp(scale q[b,t,h] . comp[b,s_k] - lse[b,t,h])      (detached target; lse of the main softmax)
    I_k = sum_j w[b,t,j] ReLU(qI[b,t,j] . kI[b,s_k])                 (the indexer's score, indexer_topk.naive's
                                                                      index_scores on the gathered keys; differentiable)
    row kept iff P = sum_{valid k} p_k > 0;  KL_row = KL(p / P || softmax_valid(I))
    loss = sum of kept rows' KL / max(#kept rows, 1)
A repeated pick is counted once per occurrence (a gather). Equal to indexer_training.indexer_kl_loss over the
selection mask (without repeats). The model calls this for both stages: the "sparse" stage passes its picks, the
"warmup" stage every visible entry.

Shapes: q (B, T, H, c); comp (B, S, c); idx (B, T, K) integer; lse (B, T, H) fp32; qI (B, T, n_I, c_I);
kI (B, S, c_I); w (B, T, n_I). Returns a 0-d loss, differentiable w.r.t. qI, kI, w (q, comp, lse detached),
computed in fp32 (bf16 / fp32 inputs) or fp64 (fp64 inputs: the tests' reference is fp64 throughout).
Queries are processed `chunk` at a time: the gathered (B, chunk, K, c) and (B, chunk, K, c_I) fp32 tensors are what
triton.py never builds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..indexer_topk.naive import index_scores


def masked_kl(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Sum over rows with >= 1 entry in `mask` of KL(target / sum || softmax_mask(scores)), and the row count.
    scores, target, mask (..., E): target >= 0 unnormalised (detached), mask bool."""
    target = torch.where(mask, target, 0.0)                                   # not target * mask: inf * 0 = nan
    tot = target.sum(-1, keepdim=True)
    rows = tot.squeeze(-1) > 0
    target = target / tot.clamp_min(1e-30)
    logq = F.log_softmax(scores.masked_fill(~mask, -1e9), dim=-1)             # finite on empty rows
    kl = (torch.xlogy(target, target) - target * logq).sum(-1)
    return (kl * rows).sum(), rows.sum()


def sparse_kl_naive(q, comp, idx, lse, scale: float, qI, kI, w, chunk: int = 4096) -> torch.Tensor:
    B, T = idx.shape[:2]
    S = comp.shape[1]
    base = (torch.arange(B, device=idx.device) * S)[:, None, None]
    comp_rows, kI_rows = comp.reshape(B * S, -1), kI.reshape(B * S, -1)
    ct = torch.promote_types(q.dtype, torch.float32)                         # fp32 at least, fp64 in tests
    kl_sum = q.new_zeros((), dtype=ct)
    n_rows = torch.zeros((), dtype=torch.long, device=q.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = idx[:, t0:t1].long()                                              # (B, Tq, K)
        valid = (s >= 0) & (s < S)
        rows = (base + s.clamp(0, max(S - 1, 0))).flatten()                   # rows of the flattened (B*S, .)
        Tq, K = s.shape[1], s.shape[2]
        # index_select: its backward is one index_add (atomic adds); advanced indexing kI[b, s] backpropagates
        # through a sorting index_put that took 58 % of a 16K training step's GPU time on the H200 (bench_e2e)
        with torch.no_grad():
            ec = comp_rows.index_select(0, rows).view(B, Tq, K, -1)
            z = torch.einsum("bthd,btkd->bthk", q[:, t0:t1].to(ct), ec.to(ct)) * scale
            p = torch.exp(z - lse[:, t0:t1, :, None].to(ct)).sum(2)           # (B, Tq, K)
        kg = kI_rows.index_select(0, rows).view(B, Tq, K, -1)
        scores = index_scores(qI[:, t0:t1], kg, w[:, t0:t1], ct)              # (B, Tq, K)
        a, n = masked_kl(scores, p, valid)
        kl_sum, n_rows = kl_sum + a, n_rows + n
    return kl_sum / n_rows.clamp_min(1)                                       # no host sync
