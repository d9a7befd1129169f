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
