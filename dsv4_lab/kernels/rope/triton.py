"""Interleaved partial RoPE in Triton: one launch forward, one backward (the naive twin: naive.py, docs §2.6).

    rope_triton(x, cos, sin, pos, inverse=False) -> x rotated, same shape and dtype
x (B, T, D) or (B, T, H, D); cos, sin (max_len, r/2) the RotaryTable's fp32 tables; pos (T,) or (B, T) integer
positions. The last r dims of every row hold r/2 interleaved pairs (2j, 2j + 1), rotated at angle pos * theta_j:
    out_2j = x_2j cos - x_2j+1 sin,    out_2j+1 = x_2j sin + x_2j+1 cos         (inverse: sin -> -sin)
computed in fp32 and stored in x's dtype; the first D - r dims are copied unchanged. The rotation is orthogonal, so
the backward is the same kernel on the incoming gradient with the opposite angle.

Design: one program owns BLOCK_R whole rows (row = (b, t, h) flattened). Each element loads its own value and its
pair partner's (2j <-> 2j + 1, an L1 hit) and the table entry of its pair at the row's position, so a row is read
once and written once. The naive twin slices, casts, builds complex numbers, multiplies and concatenates: about six
launches forward and as many backward, each writing a tensor the size of x or of its rotated half.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, jit, next_pow2, tl, triton


@jit
def _rope_kernel(X, OUT, COS, SIN, POS, NROWS, T, HH, spb, scos, ssin,
                 D: tl.constexpr, R: tl.constexpr, SIGN: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # X, OUT (NROWS, D) contiguous, row = (b T + t) HH + h; POS (B, T) with batch stride spb (0 for a (T,) table)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < NROWS
    bt = rows // HH
    b = bt // T
    pos = tl.load(POS + b * spb + (bt - b * T), mask=rmask, other=0)                   # (BLOCK_R,)
    d = tl.arange(0, BLOCK_D)
    m = rmask[:, None] & (d < D)[None, :]
    base = rows.to(tl.int64)[:, None] * D
    x = tl.load(X + base + d[None, :], mask=m, other=0.0).to(tl.float32)
    rel = d - (D - R)                                                                  # index inside the rope part
    rot = rel >= 0
    odd = (rel % 2) == 1
    partner = tl.where(rot, tl.where(odd, d - 1, d + 1), d)                            # 2j <-> 2j + 1
    xp = tl.load(X + base + partner[None, :], mask=m, other=0.0).to(tl.float32)
    j = tl.where(rot, rel // 2, 0)                                                     # table column of the pair
    mr = m & rot[None, :]
    c = tl.load(COS + pos.to(tl.int64)[:, None] * scos + j[None, :], mask=mr, other=1.0)
    s = tl.load(SIN + pos.to(tl.int64)[:, None] * ssin + j[None, :], mask=mr, other=0.0) * SIGN
    sgn = tl.where(odd, 1.0, -1.0)                                                     # 2j: x c - x' s; 2j+1: x c + x' s
    out = tl.where(rot[None, :], x * c + sgn[None, :] * xp * s, x)
    tl.store(OUT + base + d[None, :], out.to(OUT.dtype.element_ty), mask=m)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, inverse: bool) -> torch.Tensor:
    check_device(x, cos, sin, pos)
    x = x.contiguous()
    B, T, D = x.shape[0], x.shape[1], x.shape[-1]
    HH = x.shape[2] if x.dim() == 4 else 1
    pos = pos.contiguous()
    spb = pos.stride(0) if pos.dim() == 2 else 0
    out = torch.empty_like(x)
    nrows = B * T * HH
    bd = next_pow2(D)
    br = 4 if INTERPRET else max(1, 4096 // bd)
    if nrows:
        _rope_kernel[(triton.cdiv(nrows, br),)](x, out, cos, sin, pos, nrows, T, HH, spb, cos.stride(0),
                                                sin.stride(0), D=D, R=2 * cos.shape[-1], SIGN=-1 if inverse else 1,
                                                BLOCK_R=br, BLOCK_D=bd)
    return out


class RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, pos, inverse):
        ctx.save_for_backward(cos, sin, pos)
        ctx.inverse = inverse
        return _launch(x, cos, sin, pos, inverse)

    @staticmethod
    def backward(ctx, g):
        cos, sin, pos = ctx.saved_tensors
        return _launch(g, cos, sin, pos, not ctx.inverse), None, None, None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                inverse: bool = False) -> torch.Tensor:
    if x.dim() not in (3, 4) or pos.dim() not in (1, 2) or 2 * cos.shape[-1] > x.shape[-1]:
        raise ValueError(f"rope: x {tuple(x.shape)} must be (B, T, [H,] D) with D >= r = {2 * cos.shape[-1]}, "
                         f"pos {tuple(pos.shape)} (T,) or (B, T)")
    return RopeFn.apply(x, cos.float().contiguous(), sin.float().contiguous(), pos.to(x.device), bool(inverse))
