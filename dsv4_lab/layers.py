"""Small building blocks shared by every mechanism: RMSNorm and the linear layer that QAT hooks into."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.rmsnorm import rms_norm as rms_norm_op
from .kernels.swiglu import swiglu, swiglu_packed


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32 (fp64 for fp64 x; docs §0). `weight=False` gives RMSNorm_1."""

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = True, impl: str = "auto"):
        super().__init__()
        self.eps = eps
        self.impl = impl                     # cfg.kernels: the fused norm (kernels/rmsnorm) or its naive twin
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_op(x, self.weight, self.eps, impl=self.impl)


def rms_norm(x: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Weightless RMSNorm over the last dim (RMSNorm_1)."""
    return rms_norm_op(x, None, eps, impl=impl)


class Linear(nn.Linear):
    """nn.Linear without bias whose weight and input can be fake-quantised for QAT (docs §8.4).

    `quant` is set by the model from `ModelConfig.quant` and the layer's role: None (plain), "fp8" (128x128 weight
    blocks, 1x128 activation blocks) or "fp4" (MXFP4 weights, FP8 activations). Masters stay fp32; gradients pass
    straight through (dsv4_lab.quant).
    """

    def __init__(self, in_features: int, out_features: int, quant: str | None = None):
        super().__init__(in_features, out_features, bias=False)
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant:
            from .quant import qat_linear
            return qat_linear(x, self.weight, self.quant)
        return F.linear(x, self.weight)


# --- a GEMM on bf16 operands with an fp32 result (docs §2.3) ---------------------------------------------------
# The compressors compute their projections in fp32. On bf16 operands that is exact up to the order of the fp32 sums
# (the product of two bf16 numbers is exact in fp32), so on CUDA it runs on the tensor cores (torch.mm with
# out_dtype=fp32) instead of as an fp32 GEMM. One custom op whose backward is the same op, so that torch.compile
# neither rewrites it nor needs a derivative of mm's out_dtype overload. Its gradients are bf16 GEMMs with fp32
# accumulation, as autocast runs every other linear's backward, returned in the inputs' own dtypes (the fp32 master
# weights get an fp32 gradient).

def _mm_bf16(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) in out_dtype: both operands rounded to bf16, products summed in fp32 (CUDA:
    tensor cores; CPU: the same products in an fp32 GEMM). Autocast does not apply: torch.mm with out_dtype and the
    explicit casts fix the precision (autocast leaves an mm with out_dtype alone, and the CPU mm gets fp32 operands
    that CPU autocast, bf16, would round again: it is turned off there)."""
    a = a if a.dtype == torch.bfloat16 else a.to(torch.bfloat16)        # no op on bf16 operands: host time
    b = b if b.dtype == torch.bfloat16 else b.to(torch.bfloat16)
    if a.is_cuda:
        y = torch.mm(a, b, out_dtype=torch.float32)
    elif torch.is_autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            y = torch.mm(a.float(), b.float())
    else:
        y = torch.mm(a.float(), b.float())
    return y if y.dtype == out_dtype else y.to(out_dtype)               # no op on fp32 output: host time


mm_bf16 = torch.library.custom_op("dsv4_lab::mm_bf16", _mm_bf16, mutates_args=())


@mm_bf16.register_fake
def _(a, b, out_dtype):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


def _mm_bf16_setup(ctx, inputs, output):
    a, b, _ = inputs
    ctx.save_for_backward(a, b)


def _mm_bf16_backward(ctx, dy):
    """y = a b: da = dy b^T, db = a^T dy, dy rounded to bf16 like the operands."""
    a, b = ctx.saved_tensors
    da = mm_bf16(dy, b.t(), a.dtype) if ctx.needs_input_grad[0] else None
    db = mm_bf16(a.t(), dy, b.dtype) if ctx.needs_input_grad[1] else None
    return da, db, None


mm_bf16.register_autograd(_mm_bf16_backward, setup_context=_mm_bf16_setup)


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T -> (..., N) in fp32 from bf16-rounded operands (mm_bf16). Where neither autograd nor
    torch.compile needs the op (inference, eager), its body runs without the custom op's dispatch, which costs the
    host more than the GEMM's launch."""
    x2 = x.reshape(-1, x.shape[-1])
    op = mm_bf16
    if not (torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        op = _mm_bf16
    return op(x2, w.t(), torch.float32).view(*x.shape[:-1], w.shape[0])


class SwiGLU(nn.Module):
    """W2(SiLU(W1 x) * W3 x), with the optional V4 clamp (docs §5.3): up in [-L, L], gate <= L, L=0 off."""

    def __init__(self, dim: int, inter: int, limit: float = 0.0, quant: str | None = None, impl: str = "auto"):
        super().__init__()
        self.w1 = Linear(dim, inter, quant)
        self.w3 = Linear(dim, inter, quant)
        self.w2 = Linear(inter, dim, quant)
        self.limit = limit
        self.impl = impl                     # cfg.kernels: the fused activation (kernels/swiglu) or its twin

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., dim) -> (..., dim); weight (..., 1) the routing weight, applied before W2 (docs §5.3)."""
        h = swiglu(self.w1(x), self.w3(x), self.limit, weight, out_dtype=x.dtype, impl=self.impl)
        return self.w2(h)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) with W1 and W3 as one GEMM [W1; W3] x (..., 2I) and the activation written in that GEMM's
        dtype (no fp32 (..., I) copy under autocast): the same math up to rounding (the MoE's shared expert, on x
        already cast to the GEMM dtype; docs §5.4). QAT linears (per-linear fake-quantisers) take forward."""
        if self.w1.quant:
            return self(x)
        h = F.linear(x, torch.cat([self.w1.weight, self.w3.weight]))              # (..., 2I) = [gate | up]
        return F.linear(swiglu_packed(h, self.limit, None, out_dtype=h.dtype, impl=self.impl), self.w2.weight)
