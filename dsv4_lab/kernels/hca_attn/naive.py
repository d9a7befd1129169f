"""HCA core attention, naive PyTorch twin of triton.py (docs §3, §2.5; docs/kernels.md §2.3).

Query i at absolute position t = q_offset + i attends, in one softmax with the per-head sink, to
    window entries      kv[j - kv_start], j in [t - window + 1, t] ∩ [kv_start, kv_start + Tk)
                        (kv[i] holds position kv_start + i: a decode cache passes only the window it keeps)
    compressed entries  comp[s], s < min(S, floor((t + 1) / ratio))      (block-causal: block s ends at or before t)
K = V, z = scale * q . e, p = exp(z) / (sum exp(z) + exp(sink)). Equal to the masked reference sink_attention
(tests/reference_attention.py) over
concat(kv, comp) with that mask (tested).

Shapes: q (B, T, H, D); kv (B, Tk, D); comp (B, S, D); sink (H,) or None.
Returns o (B, T, H, D) in q's dtype (and lse (B, T, H) fp32; fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from ..indexer_topk.naive import visible
from ..sparse_attn.naive import gather_entries, sink_softmax


def hca_attn_naive(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0,
                   chunk: int = 2048, return_lse: bool = False, kv_start: int = 0):
    B, T, H, D = q.shape
    S = comp.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    no_idx = torch.empty(B, T, 0, dtype=torch.long, device=q.device)
    outs, lses = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        Ew, vw = gather_entries(kv, comp, no_idx, window, q_offset - kv_start, t0, t1)    # (B, Tq, W, D)
        qc = q[:, t0:t1].to(ct)
        zw = torch.einsum("bthd,btnd->bthn", qc, Ew.to(ct)) * scale
        zw = zw.masked_fill(~vw[:, :, None], float("-inf"))
        zc = torch.einsum("bthd,bsd->bths", qc, comp.to(ct)) * scale              # (B, Tq, H, S)
        vc = visible(torch.arange(t0, t1, device=q.device) + q_offset, S, ratio)       # (Tq, S) block-causal
        zc = zc.masked_fill(~vc[None, :, None], float("-inf"))
        p, lse = sink_softmax(torch.cat([zw, zc], -1), sink)                     # the softmax of sparse_attn
        W = zw.shape[-1]
        o = torch.einsum("bthn,btnd->bthd", p[..., :W], Ew.to(ct)) + \
            torch.einsum("bths,bsd->bthd", p[..., W:W + S], comp.to(ct))
        outs.append(o.to(q.dtype))
        lses.append(lse.to(ct))                                                 # fp32 (fp64 for fp64 inputs)
    o = torch.cat(outs, 1)
    return (o, torch.cat(lses, 1)) if return_lse else o
