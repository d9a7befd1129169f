"""The masked-softmax statement of core attention (docs §2.5), the tests' oracle for the kernels' naive twins
(tests/kernels_cases.py), the dense SDPA path (test_dense_sink_attention.py) and the layers (test_attention.py).

It materialises the (B, H, T, N) score matrix over explicitly concatenated entries and a boolean mask, so it is
independent of how the model's path (kernels/sparse_attn, kernels/hca_attn naive twins) gathers its entries.
"""
from __future__ import annotations

import torch


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
