"""RMSNorm in Triton: one fused launch forward, one backward (naive twin: naive.py; docs §0, docs/kernels.md §2.3).

    rms_norm_triton(x, weight, eps) -> y (..., D) in x's dtype;   x (..., D), weight (D,) or None (RMSNorm_1)

Forward, per row of D elements (fp32):  rstd = 1 / sqrt(sum(x^2) / D + eps),  xh = x rstd,  y = xh w.
Backward, per row (fp32, recomputing xh from x and the saved per-row rstd), with g = w dy:
    dx = rstd (g - xh mean(xh g)),          dw = sum over rows of dy xh.

Design: the leading dims are flattened to R rows (a copy only when they do not flatten or the last dim is strided);
a program owns BLOCK_R whole rows, BLOCK_D = next_pow2(D) columns (D <= MAX_D), so the row sums stay in registers.
The forward writes y and the (R,) fp32 rstd. The backward's programs each walk a contiguous range of rows and keep
their part of dw in registers; each writes it to its row of a (programs, D) fp32 buffer, summed by torch afterwards:
no atomics, the same bits on every run. Weightless, there is no dw and one program per BLOCK_R rows.
The naive twin runs ~6 launches forward (cast, pow, mean, rsqrt, two products, the cast back) and more backward,
each writing an fp32 tensor the size of x; here the bytes moved are x and y forward, x, dy and dx backward.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, jit, next_pow2, sm_count, tl, triton

MAX_D = 16384                                     # the widest row held in registers (the dispatcher falls back above)
_BWD_PROGRAMS = 3 if INTERPRET else None          # interpreter: few programs, so each walks several row blocks


@jit
def _rmsnorm_fwd(X, W, Y, RSTD, R, D, sx, eps,
                 HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # X (R, D) with row stride sx; Y (R, D) contiguous; RSTD (R,) fp32; W (D,)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / D + eps)                                # (BLOCK_R,)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@jit
def _rmsnorm_bwd(X, W, DY, RSTD, DX, DWP, R, D, sx, sdy, rows_per_prog,
                 HAS_W: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # X (R, D) row stride sx; DY (R, D) row stride sdy; DX (R, D) contiguous; RSTD (R,) fp32;
    # DWP (programs, D) fp32: this program's part of dw (rows [pid rows_per_prog, (pid + 1) rows_per_prog))
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    r_start = pid * rows_per_prog
    for r0 in range(r_start, r_start + rows_per_prog, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xh = x * rstd[:, None]
        g = dy
        if HAS_W:
            g = dy * w[None, :]
        if NEED_DW:
            dw += tl.sum(dy * xh, 0)
        c = tl.sum(xh * g, 1) / D                                                      # mean(xh g) per row
        dx = (g - xh * c[:, None]) * rstd[:, None]
        tl.store(DX + r64 * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(DWP + pid * D + cols, dw, mask=cmask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> a (R, D) view (copy only when the leading dims do not flatten or the last dim is strided)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _blocks(D: int):
    """(BLOCK_R, BLOCK_D, num_warps): whole rows of next_pow2(D) columns, ~4K elements per program on the GPU."""
    bd = next_pow2(D)
    br = 4 if INTERPRET else max(1, min(64, 4096 // bd))
    return br, bd, min(16, max(1, br * bd // 512))


def _bwd_programs(device: torch.device, n_blocks: int) -> int:
    if _BWD_PROGRAMS is not None:
        return min(n_blocks, _BWD_PROGRAMS)
    return min(n_blocks, 4 * sm_count(device))


def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float):
    check_device(x, weight)
    x2 = _rows(x)
    R, D = x2.shape
    y = torch.empty(R, D, device=x.device, dtype=x.dtype)
    rstd = torch.empty(R, device=x.device, dtype=torch.float32)
    br, bd, nw = _blocks(D)
    if R:
        _rmsnorm_fwd[(triton.cdiv(R, br),)](x2, weight if weight is not None else y, y, rstd, R, D, x2.stride(0),
                                            float(eps), HAS_W=weight is not None, BLOCK_R=br, BLOCK_D=bd,
                                            num_warps=nw)
    return y.view(x.shape), rstd


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, need_w: bool):
    x2 = _rows(x)
    R, D = x2.shape
    dy2 = _rows(dy)
    dx = torch.empty(R, D, device=x.device, dtype=x.dtype)
    need_dw = weight is not None and need_w
    br, bd, nw = _blocks(D)
    n_blocks = triton.cdiv(R, br)
    progs = _bwd_programs(x.device, n_blocks) if need_dw and R else n_blocks
    rows_per_prog = triton.cdiv(n_blocks, max(progs, 1)) * br             # a multiple of BLOCK_R
    progs = triton.cdiv(R, rows_per_prog) if R else 0                      # no program without rows
    dwp = torch.empty(progs, D, device=x.device, dtype=torch.float32) if need_dw else dx
    if R:
        _rmsnorm_bwd[(progs,)](x2, weight if weight is not None else dx, dy2, rstd, dx, dwp, R, D, x2.stride(0),
                               dy2.stride(0), rows_per_prog, HAS_W=weight is not None, NEED_DW=need_dw,
                               BLOCK_R=br, BLOCK_D=bd, num_warps=nw)
    dw = None
    if need_dw:
        dw = (dwp.sum(0) if R else torch.zeros(D, device=x.device, dtype=torch.float32)).to(weight.dtype)
    return dx.view(x.shape), dw


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rmsnorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_bwd(dy, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    D = x.shape[-1]
    if D > MAX_D or (weight is not None and weight.shape != (D,)):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} with D <= {MAX_D} and weight (D,) or None are allowed, got "
                         f"weight {None if weight is None else tuple(weight.shape)}")
    return RMSNormFn.apply(x, weight.contiguous() if weight is not None else None, float(eps))
