"""Quantisation-aware training entry points used by the model (docs §8.2, §8.4, §2.2, §6.3).

    qat_linear(x, w, "fp8")   y = FP8(x; 1 x 128 along K) @ FP8(w; 128 x 128 tiles)^T        (V3-style FP8 linears)
    qat_linear(x, w, "fp4")   y = FP8(x; 1 x 128) @ FP8tiles(MXFP4(w; 1 x 32 along K))^T    (routed experts)
    fake_quant_kv(kv, r)      FP8 E4M3 in blocks of 64 on the non-RoPE dims [0, c - r); the last r RoPE dims
                              are returned untouched (the reference keeps them BF16)

Masters stay fp32; every fake quantiser passes the gradient straight through, so dL/dw is the gradient w.r.t. the
quantised weight (docs §8.4) and dL/dx w.r.t. the quantised activation. The quantised values are exact in bf16, so
the same numbers come out under bf16 autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp4_to_fp8 import fake_quant_mxfp4_fp8_weight
from .fp8 import fake_quant_fp8, fake_quant_fp8_weight

QAT_KINDS = ("fp8", "fp4")
ACT_BLOCK = 128          # activations: 1 x 128 along K
WEIGHT_TILE = 128        # FP8 weights: 128 x 128
KV_BLOCK = 64            # KV entries: 64 per scale (docs §2.2)


def qat_weight(w: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "fp8":
        return fake_quant_fp8_weight(w, WEIGHT_TILE)
    if kind == "fp4":
        return fake_quant_mxfp4_fp8_weight(w)
    raise ValueError(f"quant kind = {kind!r} is not allowed: one of {QAT_KINDS}")


def qat_linear(x: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """F.linear(x, w) with x (..., K) and w [N, K] fake-quantised for `kind` in ("fp8", "fp4")."""
    wq = qat_weight(w, kind)
    xq = fake_quant_fp8(x, ACT_BLOCK)
    return F.linear(xq, wq.to(xq.dtype) if not torch.is_autocast_enabled() else wq)


def fake_quant_kv(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """x (..., c): FP8 blocks of 64 on dims [0, c - rope_dim) (a partial last block if c - rope_dim is not a
    multiple of 64), RoPE dims [c - rope_dim, c) unchanged. Straight-through gradient."""
    c = x.shape[-1]
    if not 0 <= rope_dim <= c:
        raise ValueError(f"rope_dim = {rope_dim} is not allowed: an integer in [0, {c}] (the head dim)")
    if rope_dim == 0:
        return fake_quant_fp8(x, KV_BLOCK)
    nope, rope = x[..., : c - rope_dim], x[..., c - rope_dim:]
    return torch.cat([fake_quant_fp8(nope, KV_BLOCK), rope], -1)
