"""Core attention of every V4 layer (docs §2.5): one softmax over window entries and compressed entries together,
with a learned per-head sink logit that only enlarges the denominator. K = V (shared single head, MQA).

This is the readable reference (and the CPU path). It materialises a (B, H, T, T + S) score matrix, so it is for
lab-sized sequences; the Triton kernels in dsv4_lab/kernels compute the same thing without it.
"""
from __future__ import annotations

import torch


def window_mask(T: int, window: int | None, device=None, q_offset: int = 0, T_k: int | None = None) -> torch.Tensor:
    """(T, T_k) bool: key j visible to query t iff t - window < j <= t (window=None: all j <= t).

    Query i sits at absolute position q_offset + i; key j at position j (keys start at 0).
    """
    T_k = T_k if T_k is not None else T + q_offset
    t = torch.arange(T, device=device)[:, None] + q_offset
    j = torch.arange(T_k, device=device)[None, :]
    m = j <= t
    if window is not None:
        m &= j > t - window
    return m


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor | None,
                   scale: float, return_probs: bool = False):
    """o_{t,h} = sum_j p_{h,j} kv_j,  p = exp(z) / (sum exp(z) + exp(sink_h)),  z = q.kv * scale  (docs §2.5).

    q: (B, T, H, D); kv: (B, N, D) entries (window and compressed, concatenated); mask: (B or 1, T, N) bool,
    True = visible; sink: (H,) logits or None (off). Rows with nothing visible and no sink give 0.
    Returns o (B, T, H, D) [and p (B, H, T, N) in fp32 (fp64 for fp64 inputs)].
    """
    ct = torch.promote_types(q.dtype, torch.float32)                             # fp32 at least (fp64 in tests)
    z = torch.einsum("bthd,bnd->bhtn", q.to(ct), kv.to(ct)) * scale              # (B, H, T, N)
    z = z.masked_fill(~mask[:, None], float("-inf"))
    if sink is not None:
        s = sink.to(ct).view(1, -1, 1, 1).expand(z.shape[0], -1, z.shape[2], 1)
        z = torch.cat([z, s], dim=-1)                                            # the sink column
    m = z.amax(-1, keepdim=True).clamp_min(-1e30)                                # guard all -inf rows
    e = torch.exp(z - m)
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-30)
    if sink is not None:
        p = p[..., :-1]
    o = torch.einsum("bhtn,bnd->bthd", p, kv.to(ct)).to(q.dtype)
    return (o, p) if return_probs else o
