"""HCA core attention, naive PyTorch twin of triton.py (docs §3, §2.5; docs/kernels.md §2.3).

Query i at absolute position t = q_offset + i attends, in one softmax with the per-head sink, to
    window entries      kv[j - kv_start], j in [t - window + 1, t] ∩ [kv_start, kv_start + Tk)
                        (kv[i] holds position kv_start + i: a decode cache passes only the window it keeps)
    compressed entries  comp[s], s < min(S, floor((t + 1) / ratio))      (block-causal: block s ends at or before t)
K = V, z = scale * q . e, p = exp(z) / (sum exp(z) + exp(sink)). Equal to the masked reference sink_attention
(tests/reference_attention.py) over
concat(kv, comp) with that mask (tested).

The window is read as a band of consecutive rows (sparse_attn/naive.py `window_band`), the compressed entries as
one dense product (B, Tq H, D) @ (B, D, S) with the block-causal mask (heads folded into the GEMM rows).

Shapes: q (B, T, H, D); kv (B, Tk, D); comp (B, S, D); sink (H,) or None.
Returns o (B, T, H, D) in q's dtype (and lse (B, T, H) fp32; fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from ..indexer_topk.naive import visible
from ..sparse_attn.naive import sink_softmax, window_band, window_output


def hca_attn_naive(q, kv, comp, sink, scale: float, window: int, ratio: int, q_offset: int = 0,
                   chunk: int = 2048, return_lse: bool = False, kv_start: int = 0, block: int = 64):
    B, T, H, D = q.shape
    S = comp.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    kvc, compc = kv.to(ct), comp.to(ct)
    L = max(1, min(block, T))
    outs, lses = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        qc = q[:, t0:t1].to(ct) * scale
        zw, Kb, nb = window_band(qc, kvc, window, q_offset - kv_start + t0, L)     # (B, Tq, H, Lw) the band
        Tq = t1 - t0
        zc = torch.matmul(qc.reshape(B, Tq * H, D), compc.transpose(1, 2)).view(B, Tq, H, S)   # heads in GEMM rows
        vc = visible(torch.arange(t0, t1, device=q.device) + q_offset, S, ratio)   # (Tq, S) block-causal
        zc = zc.masked_fill(~vc[None, :, None], float("-inf"))
        (pw, pc), lse = sink_softmax([zw, zc], sink)                              # the softmax of sparse_attn
        o = torch.matmul(pc.reshape(B, Tq * H, S), compc).view(B, Tq, H, D)
        ow = window_output(pw, Kb, nb, L)
        o = o if ow is None else ow + o
        outs.append(o.to(q.dtype))
        lses.append(lse.to(ct))                                                 # fp32 (fp64 for fp64 inputs)
    o = torch.cat(outs, 1)
    return (o, torch.cat(lses, 1)) if return_lse else o
