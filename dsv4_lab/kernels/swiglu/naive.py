"""The clamped SwiGLU activation (docs §5.3), naive PyTorch twin of triton.py and the model's reference path.

    h = SiLU(clamp(gate, max=L)) * clamp(up, -L, L) * w          (L = limit; L = 0: no clamp; w = None: no weight)

gate, up (..., I); w broadcastable to them ((..., 1): the routing weight of each row, applied before W2) or None.
Computed in fp32 (fp64 for fp64 inputs), returned in out_dtype. Autograd by PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_naive(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0, weight: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    ct = torch.promote_types(gate.dtype, torch.float32)
    out_dtype = out_dtype or gate.dtype
    gate, up = gate.to(ct), up.to(ct)
    if limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    h = F.silu(gate) * up
    if weight is not None:
        h = h * weight
    return h.to(out_dtype)
