"""The clamped SwiGLU activation in Triton: one fused launch forward, one backward (same interface as naive.py).

Design: one program owns BLOCK_R rows and walks their I columns BLOCK_I at a time, so the backward can sum the
routing weight's gradient over a whole row in registers. Forward, per element (fp32):
    g = min(gate, L), u = clamp(up, -L, L)  (L > 0),  s = sigmoid(g),  h = g s u [w_r]          -> out dtype
Backward (recomputed from gate and up; the clamp passes the gradient where its input lies inside the bounds, as
torch.clamp does):
    dg = dh w_r u s (1 + g (1 - s)) 1[gate <= L],   du = dh w_r g s 1[-L <= up <= L],   dw_r = sum_i dh g s u
The naive twin runs ~8 elementwise launches forward (casts, two clamps, SiLU, two products, the cast back) and
more backward, each writing an fp32 (rows x I) intermediate; here the bytes moved are gate, up and h forward,
gate, up, dh, dgate and dup backward.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, jit, next_pow2, tl, triton

BLOCK_R = 4 if INTERPRET else 8


@jit
def _load(G, U, rows, cols, sg, su, mask):
    g = tl.load(G + rows.to(tl.int64)[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows.to(tl.int64)[:, None] * su + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return g, u


@jit
def _swiglu_fwd(G, U, WT, OUT, R, I, sg, su, L,
                CLAMP: tl.constexpr, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    # OUT (R, I) contiguous; WT (R,) fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    if HAS_W:
        w = tl.load(WT + rows, mask=rmask, other=0.0)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = rmask[:, None] & (cols < I)[None, :]
        g, u = _load(G, U, rows, cols, sg, su, mask)
        if CLAMP:
            u = tl.minimum(tl.maximum(u, -L), L)
            g = tl.minimum(g, L)
        h = g * tl.sigmoid(g) * u
        if HAS_W:
            h = h * w[:, None]
        tl.store(OUT + rows.to(tl.int64)[:, None] * I + cols[None, :], h.to(OUT.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd(G, U, WT, DH, DG, DU, DW, R, I, sg, su, sd, L,
                CLAMP: tl.constexpr, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    # DH (R, I) contiguous; DG, DU (R, I) with row stride sd (I, or 2 I: the halves of one (R, 2I) gradient);
    # WT, DW (R,) fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    if HAS_W:
        w = tl.load(WT + rows, mask=rmask, other=0.0)
    dw = tl.zeros([BLOCK_R], tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = rmask[:, None] & (cols < I)[None, :]
        off = rows.to(tl.int64)[:, None] * I + cols[None, :]
        offd = rows.to(tl.int64)[:, None] * sd + cols[None, :]
        g, u = _load(G, U, rows, cols, sg, su, mask)
        dh = tl.load(DH + off, mask=mask, other=0.0).to(tl.float32)
        pass_g = mask
        pass_u = mask
        if CLAMP:
            pass_g = pass_g & (g <= L)
            pass_u = pass_u & (u >= -L) & (u <= L)
            u = tl.minimum(tl.maximum(u, -L), L)
            g = tl.minimum(g, L)
        s = tl.sigmoid(g)
        silu = g * s
        if HAS_W:
            dw += tl.sum(tl.where(mask, dh * silu * u, 0.0), 1)
            dh = dh * w[:, None]
        dg = tl.where(pass_g, dh * u * s * (1.0 + g * (1.0 - s)), 0.0)
        du = tl.where(pass_u, dh * silu, 0.0)
        tl.store(DG + offd, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offd, du.to(DU.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW + rows, dw, mask=rmask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., I) -> a (R, I) view (copy only when the leading dims do not flatten or the last dim is strided)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_args(I: int):
    return dict(BLOCK_R=BLOCK_R, BLOCK_I=min(next_pow2(I), 16 if INTERPRET else 512))


def swiglu_fwd(gate, up, limit: float, weight, out_dtype):
    check_device(gate, up, weight)
    g2, u2 = _rows(gate), _rows(up)
    R, I = g2.shape
    out = torch.empty(R, I, device=gate.device, dtype=out_dtype)
    w = weight.reshape(R).float().contiguous() if weight is not None else out
    if R:
        _swiglu_fwd[(triton.cdiv(R, BLOCK_R),)](g2, u2, w, out, R, I, g2.stride(0), u2.stride(0), float(limit),
                                                CLAMP=limit > 0, HAS_W=weight is not None, **_launch_args(I))
    return out.view(gate.shape)


def swiglu_bwd(dh, gate, up, limit: float, weight, need_w: bool, packed: bool = False):
    """-> (dgate, dup, dweight); packed: gate and up are the halves [gate | up] of one (..., 2I) tensor and the first
    item is their gradient as one (R, 2I) tensor (dup None): no concatenation afterwards."""
    g2, u2 = _rows(gate), _rows(up)
    R, I = g2.shape
    dh2 = dh.reshape(R, I).contiguous()
    if packed:
        buf = torch.empty(R, 2 * I, device=gate.device, dtype=gate.dtype)
        dg, du = buf[:, :I], buf[:, I:]
    else:
        dg = torch.empty(R, I, device=gate.device, dtype=gate.dtype)
        du = torch.empty(R, I, device=up.device, dtype=up.dtype)
    has_w = weight is not None
    w = weight.reshape(R).float().contiguous() if has_w else dg
    dw = torch.empty(R, device=gate.device, dtype=torch.float32) if has_w else dg
    if R:
        _swiglu_bwd[(triton.cdiv(R, BLOCK_R),)](g2, u2, w, dh2, dg, du, dw, R, I, g2.stride(0), u2.stride(0),
                                                dg.stride(0), float(limit), CLAMP=limit > 0, HAS_W=has_w,
                                                **_launch_args(I))
    dw = dw.view(weight.shape).to(weight.dtype) if has_w and need_w else None
    if packed:
        return buf, None, dw
    return dg.view(gate.shape), du.view(up.shape), dw


class SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, limit, out_dtype):
        ctx.save_for_backward(gate, up, weight)
        ctx.limit = limit
        return swiglu_fwd(gate, up, limit, weight, out_dtype)

    @staticmethod
    def backward(ctx, dh):
        gate, up, weight = ctx.saved_tensors
        dg, du, dw = swiglu_bwd(dh, gate, up, ctx.limit, weight, ctx.needs_input_grad[2])
        return dg, du, dw, None, None


def swiglu_triton(gate, up, limit: float = 0.0, weight=None, out_dtype=None):
    if weight is not None and weight.numel() != gate.numel() // gate.shape[-1]:
        raise ValueError(f"swiglu weight of shape {tuple(weight.shape)}: one value per row of gate "
                         f"{tuple(gate.shape)} is allowed")
    return SwiGLUFn.apply(gate, up, weight, float(limit), out_dtype or gate.dtype)


class SwiGLUPackedFn(torch.autograd.Function):
    """h (..., 2I) = [gate | up] as one tensor: the backward writes dh (..., 2I) directly (with gate and up as
    separate autograd inputs, chunk's backward would concatenate dgate and dup: one more (R, 2I) copy)."""

    @staticmethod
    def forward(ctx, h, weight, limit, out_dtype):
        ctx.save_for_backward(h, weight)
        ctx.limit = limit
        gate, up = h.chunk(2, dim=-1)
        return swiglu_fwd(gate, up, limit, weight, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        h, weight = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh, _, dw = swiglu_bwd(dout, gate, up, ctx.limit, weight, ctx.needs_input_grad[1], packed=True)
        return dh.view(h.shape), dw, None, None


def swiglu_triton_packed(h, limit: float = 0.0, weight=None, out_dtype=None):
    """swiglu_triton(*h.chunk(2, -1), ...) with h (..., 2I) one tensor (its gradient comes back as one tensor)."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu_packed input of shape {tuple(h.shape)}: an even last dim [gate | up] is allowed")
    if weight is not None and weight.numel() != h.numel() // h.shape[-1]:
        raise ValueError(f"swiglu weight of shape {tuple(weight.shape)}: one value per row of h "
                         f"{tuple(h.shape)} is allowed")
    return SwiGLUPackedFn.apply(h, weight, float(limit), out_dtype or h.dtype)
