"""FP8 / MXFP4 fake quantisation in Triton, bit-exact with naive.py and dsv4_lab.quant (spec §8.1).

One program owns a (TR, BLOCK) tile: TR rows of one column block (1-D blocks along the last dim, one scale per row)
or one BLOCK x BLOCK weight tile (tile=True, one scale). All arithmetic is fp32 with integer bit operations for the
scale exponent and the magic-number RNE (exact in the interpreter too, kernels.md §7 rule 3). Purely
bandwidth-bound: reads and writes each element once.
"""
from __future__ import annotations

import torch

from .._common import check_device, tl, triton
from .naive import FORMATS


@triton.jit
def _fake_quant_kernel(X, Y, R, K, inv_qmax,
                       sxb, sxr, syb, syr,
                       QMAX: tl.constexpr, FLOOR: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                       TR: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    pb = tl.program_id(2).to(tl.int64)
    rows = pr * TR + tl.arange(0, TR)
    cols = pc * BLOCK + tl.arange(0, BLOCK)
    m = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(X + pb * sxb + rows.to(tl.int64)[:, None] * sxr + cols[None, :], mask=m, other=0.0)
    xf = x.to(tl.float32)
    ax = tl.abs(xf)
    if TILE:
        amax = tl.max(tl.max(ax, 1), 0)
        amax = tl.full([TR], 0.0, tl.float32) + amax
    else:
        amax = tl.max(ax, 1)                                                    # (TR,)
    r = tl.maximum(amax, FLOOR) * inv_qmax
    rb = r.to(tl.int32, bitcast=True)
    e = ((rb >> 23) & 0xFF) - 127 + ((rb & 0x7FFFFF) != 0).to(tl.int32)       # ceil(log2 r), exact
    inv_s = ((127 - e) << 23).to(tl.float32, bitcast=True)                      # 2^-e
    s = ((e + 127) << 23).to(tl.float32, bitcast=True)                          # 2^e
    y = xf * inv_s[:, None]
    a = tl.minimum(tl.abs(y), QMAX)
    ea = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    u = tl.maximum(ea, EMIN) - MANT
    c = (((u + 150) << 23) | 4194304).to(tl.float32, bitcast=True)              # 1.5 * 2^(u + 23)
    rr = (a + c) - c
    sign = (y.to(tl.int32, bitcast=True) >> 31) << 31                          # x's sign bit (keeps -0.0)
    q = (rr.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    out = q * s[:, None]
    tl.store(Y + pb * syb + rows.to(tl.int64)[:, None] * syr + cols[None, :], out.to(Y.dtype.element_ty), mask=m)


def fake_quant_triton(x: torch.Tensor, fmt: str = "fp8", block: int = 128, tile: bool = False) -> torch.Tensor:
    check_device(x)
    if fmt not in FORMATS:
        raise ValueError(f"fake_quant: fmt={fmt!r} is not allowed: one of {sorted(FORMATS)}")
    if block & (block - 1) or block < 1:
        raise ValueError(f"fake_quant triton: block = {block} is not allowed: a power of two")
    qmax, floor, mant, emin = FORMATS[fmt]
    xc = x.contiguous()
    K = x.shape[-1]
    if tile:
        R = x.shape[-2] if x.dim() >= 2 else 1
        x3 = xc.reshape(-1, R, K)
        TR = block
    else:
        x3 = xc.reshape(1, -1, K)
        R = x3.shape[1]
        TR = max(1, min(64, 4096 // block))
    y3 = torch.empty_like(x3)
    if x3.numel():
        grid = (triton.cdiv(R, TR), triton.cdiv(K, block), x3.shape[0])
        _fake_quant_kernel[grid](x3, y3, R, K, float(torch.tensor(1.0 / qmax, dtype=torch.float32)),
                                 x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1),
                                 QMAX=qmax, FLOOR=floor, MANT=mant, EMIN=emin, TR=TR, BLOCK=block, TILE=tile,
                                 num_warps=4 if TR * block <= 4096 else 8)
    return y3.reshape(x.shape)
