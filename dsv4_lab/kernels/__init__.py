"""Triton kernels for the hot paths, each beside its naive PyTorch twin (docs/kernels.md).

    dsv4_lab/kernels/<op>/naive.py    the readable reference (any device, autograd by PyTorch)
    dsv4_lab/kernels/<op>/triton.py   the Triton kernel(s) with the same functional interface
    dsv4_lab/kernels/<op>/__init__.py the dispatcher `<op>(..., impl="auto"|"triton"|"torch")`

ops: sparse_attn (CSA core), hca_attn (HCA core), indexer_topk (lightning-indexer scores + top-k, forward only),
mhc (fused mHC pre / post), fake_quant (FP8 block / MXFP4, bit-exact with dsv4_lab.quant), sparse_kl (the
sparse-stage indexer KL loss over the top-k picks, fwd + bwd), compressor_pool (the token-level compressors' pool
+ ape + RMSNorm (+ RoPE), fwd + bwd), swiglu (the clamped SwiGLU activation, fwd + bwd), rope (interleaved partial
RoPE, fwd + bwd), rmsnorm (RMSNorm over the last dim, with or without weight, fwd + bwd).

`ModelConfig.kernels` = auto | triton | torch picks the path; `use_triton(cfg, tensor)` is the single rule:
auto = Triton on CUDA tensors (when triton imports), torch elsewhere; triton = always (CUDA, or the CPU interpreter
with TRITON_INTERPRET=1); torch = never.
"""
from __future__ import annotations

import torch

from ._common import HAVE_TRITON, INTERPRET


def resolve_impl(impl: str, tensor) -> str:
    """'auto' | 'triton' | 'torch' -> 'triton' | 'torch' for this tensor."""
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("kernels='triton' but triton does not import; allowed: kernels='torch' or 'auto'")
        return "triton"
    if impl == "auto":
        return "triton" if (HAVE_TRITON and (tensor.is_cuda or INTERPRET)) else "torch"
    raise ValueError(f"kernels={impl!r} is not allowed: one of auto, triton, torch")


def eager_triton(impl: str, tensor) -> bool:
    """The rule of the elementwise ops (rope, rmsnorm, swiglu): their Triton kernel when `impl` resolves to triton
    for `tensor`, the tensor is not fp64 (the naive twin keeps fp64 exact) and torch.compile is not tracing (Inductor
    fuses the naive twin's elementwise chain itself)."""
    return (resolve_impl(impl, tensor) == "triton" and tensor.dtype != torch.float64
            and not torch.compiler.is_compiling())


def use_triton(cfg, tensor) -> bool:
    """True when the model should call the Triton kernels for `tensor` under `cfg.kernels` (auto|triton|torch)."""
    return resolve_impl(getattr(cfg, "kernels", "auto"), tensor) == "triton"


__all__ = ["use_triton", "resolve_impl", "eager_triton", "HAVE_TRITON", "INTERPRET"]
