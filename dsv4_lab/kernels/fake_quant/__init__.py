"""FP8 / MXFP4 fake quantisation (docs §8.1), bit-exact with dsv4_lab.quant's reference functions.

    fake_quant(x, fmt="fp8"|"fp4", block=128, tile=False, impl="auto")       -> same shape and dtype as x
    fake_quant(x, "fp8", 128)            = dsv4_lab.quant.fake_quant_fp8_ref(x, 128)   (1 x 128 activations)
    fake_quant(x, "fp8", 64)             = fake_quant_fp8_ref(x, 64)                   (KV blocks)
    fake_quant(x, "fp8", 128, tile=True) = fake_quant_fp8_weight_ref(x, 128)           (128 x 128 weight tiles)
    fake_quant(x, "fp4", 32)             = fake_quant_mxfp4_ref(x)                     (MXFP4)
Gradients pass straight through (identity: `ste`). dsv4_lab.quant's fake_quant_fp8 / fake_quant_fp8_weight /
fake_quant_mxfp4 (what the model calls) are this dispatcher.
"""
from __future__ import annotations

import torch

from .. import resolve_impl
from .naive import fake_quant_naive


class _STE(torch.autograd.Function):
    """Forward: the quantised tensor q; backward: the gradient w.r.t. q goes unchanged to x."""

    @staticmethod
    def forward(ctx, x, q):
        return q

    @staticmethod
    def backward(ctx, g):
        return g, None


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward pass, identity gradient to x (straight-through estimator)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q
    return _STE.apply(x, q)


def fake_quant(x: torch.Tensor, fmt: str = "fp8", block: int = 128, tile: bool = False, impl: str = "auto"):
    if resolve_impl(impl, x) == "triton" and block & (block - 1) == 0:
        from .triton import fake_quant_triton
        q = fake_quant_triton(x.detach(), fmt, block, tile)
    else:
        q = fake_quant_naive(x.detach(), fmt, block, tile)
    return ste(x, q)


__all__ = ["fake_quant", "fake_quant_naive", "ste"]
