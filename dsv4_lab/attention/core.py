"""Masks and the dense layers' core attention (docs §2.5): one softmax with a learned per-head sink logit that only
enlarges the denominator, K = V (shared single head, MQA).

Window / compressed layers attend through the kernel dispatchers (dsv4_lab/kernels: sparse_attn, hca_attn; their
naive twins are the CPU path and the reference). Dense layers (the baseline arm) go through torch's fused SDPA here.
`window_mask` states the window rule as a mask, for notebooks and tests.
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


def dense_causal_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor | None, scale: float,
                           q_offset: int = 0) -> torch.Tensor:
    """Causal MQA over every earlier token (dense layers) through torch's fused SDPA: no (T, T) score matrix.

    q: (B, T, H, D) at positions q_offset .. q_offset+T-1; kv: (B, Tk, D) shared K = V at positions 0 .. Tk-1
    (Tk = q_offset + T: a decode chunk sees the cache's earlier tokens); sink: (H,) logits or None.
    Returns o (B, T, H, D). The sink (docs §2.5) is folded in exactly as one extra key with zero value whose score
    is sink_h:
        keys    [e_D, k_0, ..., k_{Tk-1}]      k'_j = [k_j, 0]; the sink key = [0, 1]     (D + 8 dims, padded
        values  [0,   v_0, ..., v_{Tk-1}]      v'_j = [v_j, 0]                            to a multiple of 8)
        queries        q'_t = [q_t, sink_h / scale]
    so q'_t . k'_j * scale = z_tj and q'_t . sink * scale = sink_h: p = exp(z) / (sum exp(z) + exp(sink_h)).
    Without an offset, a dummy first query row makes the (T + 1)-square causal mask exactly "the sink and keys
    0..t" (is_causal, no mask tensor); with one, an explicit (T, Tk + 1) mask does. K and V stay shared across
    heads (expanded views)."""
    B, T, H, D = q.shape
    Tk = kv.shape[1]
    F = torch.nn.functional
    square = q_offset == 0 and Tk == T
    if sink is None:
        kvh = kv[:, None].expand(-1, H, -1, -1)
        mask = None if square else \
            torch.arange(Tk, device=q.device)[None] <= torch.arange(T, device=q.device)[:, None] + q_offset
        return F.scaled_dot_product_attention(q.transpose(1, 2), kvh, kvh, attn_mask=mask, is_causal=square,
                                              scale=scale).transpose(1, 2)
    pad = 8                                                           # one sink dim, padded for the fused kernels
    s = (sink.to(q.dtype) / scale).view(1, 1, H, 1).expand(B, T, H, 1)
    qx = torch.cat([q, s, q.new_zeros(B, T, H, pad - 1)], -1)                     # (B, T, H, D + pad)
    if square:
        qx = torch.cat([qx.new_zeros(B, 1, H, D + pad), qx], 1)                   # the dummy row: (B, T + 1, ...)
    qx = qx.transpose(1, 2)
    sink_key = kv.new_zeros(B, 1, D + pad)
    sink_key[..., D] = 1.0
    kx = torch.cat([sink_key, torch.cat([kv, kv.new_zeros(B, Tk, pad)], -1)], 1)  # (B, Tk + 1, D + pad)
    kx = kx[:, None].expand(-1, H, -1, -1)
    vx = torch.cat([kv.new_zeros(B, 1, D + pad), torch.cat([kv, kv.new_zeros(B, Tk, pad)], -1)], 1)
    vx = vx[:, None].expand(-1, H, -1, -1)
    if square:
        o = F.scaled_dot_product_attention(qx, kx, vx, is_causal=True, scale=scale)   # (B, H, T + 1, D + pad)
        return o[:, :, 1:, :D].transpose(1, 2)
    j = torch.arange(Tk + 1, device=q.device)[None]                                # key j - 1; j = 0 the sink
    mask = j <= torch.arange(T, device=q.device)[:, None] + q_offset + 1            # (T, Tk + 1)
    o = F.scaled_dot_product_attention(qx, kx, vx, attn_mask=mask, scale=scale)      # (B, H, T, D + pad)
    return o[..., :D].transpose(1, 2)
