"""FP8 / MXFP4 fake quantisation in Triton, bit-exact with naive.py and dsv4_lab.quant (docs §8.1).

1-D blocks (FP8 1 x 128 / 1 x 64, MXFP4 1 x 32; `_fake_quant_groups_kernel`): the tensor is a flat list of
R x ceil(K / BLOCK) groups (a partial last block of a row is its own group); one program owns GB consecutive groups
as a [GB, BLOCK] tile (EPP = GB x BLOCK elements, 8192 by default), i.e. one contiguous stretch of memory when
K % BLOCK == 0 (16-byte vector loads, no per-row strides), one scale per tile row.
2-D tiles (tile=True, FP8 128 x 128 weights; `_fake_quant_kernel`): one program owns one BLOCK x BLOCK tile, one
scale. (That kernel also ran the 1-D blocks before, one (TR, BLOCK) tile of TR rows of one column block per program;
`variant="rows"` keeps it for the benchmark's same-run comparison.)
All arithmetic is fp32 with integer bit operations for the scale exponent and the magic-number RNE (exact in the
interpreter too, docs/kernels.md §7 rule 3). Purely bandwidth-bound: reads and writes each element once.
"""
from __future__ import annotations

import torch

from .._common import check_device, jit, tl, triton
from .naive import FORMATS


@jit
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
    out = _quant_tile(xf, amax, inv_qmax, QMAX, FLOOR, MANT, EMIN)
    tl.store(Y + pb * syb + rows.to(tl.int64)[:, None] * syr + cols[None, :], out.to(Y.dtype.element_ty), mask=m)


@jit
def _quant_tile(xf, amax, inv_qmax, QMAX: tl.constexpr, FLOOR: tl.constexpr, MANT: tl.constexpr,
                EMIN: tl.constexpr):
    """xf (GB, BLOCK) fp32, amax (GB,) -> fake-quantised fp32 (docs §8.1; naive.py's rules, bit for bit)."""
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
    return q * s[:, None]


@jit
def _fake_quant_groups_kernel(X, Y, NG, K, inv_qmax,
                              QMAX: tl.constexpr, FLOOR: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                              GB: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * GB + tl.arange(0, GB)                 # (GB,) group ids
    j = tl.arange(0, BLOCK)
    if EVEN:                                                                   # K % BLOCK == 0: contiguous groups
        off = g[:, None] * BLOCK + j[None, :]
        m = (g < NG)[:, None]
    else:
        ngk = (K + BLOCK - 1) // BLOCK
        row = g // ngk
        col = (g - row * ngk) * BLOCK
        off = row[:, None] * K + col[:, None] + j[None, :]
        m = (g < NG)[:, None] & ((col[:, None] + j[None, :]) < K)
    xf = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(xf), 1)                                                # (GB,)
    out = _quant_tile(xf, amax, inv_qmax, QMAX, FLOOR, MANT, EMIN)
    tl.store(Y + off, out.to(Y.dtype.element_ty), mask=m)


def fake_quant_triton(x: torch.Tensor, fmt: str = "fp8", block: int = 128, tile: bool = False,
                      variant: str = "groups", epp: int = 8192, num_warps: int = 8) -> torch.Tensor:
    """variant / epp (elements per program) / num_warps choose the 1-D-block kernel (benchmark sweeps); the defaults
    are the library's choice. tile=True always uses the 2-D tile kernel."""
    check_device(x)
    if fmt not in FORMATS:
        raise ValueError(f"fake_quant: fmt={fmt!r} is not allowed: one of {sorted(FORMATS)}")
    if block & (block - 1) or block < 1:
        raise ValueError(f"fake_quant triton: block = {block} is not allowed: a power of two")
    if variant not in ("groups", "rows"):
        raise ValueError(f"fake_quant triton: variant = {variant!r} is not allowed: 'groups' or 'rows'")
    qmax, floor, mant, emin = FORMATS[fmt]
    inv_qmax = float(torch.tensor(1.0 / qmax, dtype=torch.float32))
    xc = x.contiguous()
    K = x.shape[-1]
    if not tile and variant == "groups":
        y = torch.empty_like(xc)
        ng = (xc.numel() // K) * triton.cdiv(K, block) if K else 0
        gb = max(1, epp // block)
        if ng:
            _fake_quant_groups_kernel[(triton.cdiv(ng, gb),)](
                xc, y, ng, K, inv_qmax, QMAX=qmax, FLOOR=floor, MANT=mant, EMIN=emin, GB=gb, BLOCK=block,
                EVEN=K % block == 0, num_warps=num_warps)
        return y.reshape(x.shape)
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
        _fake_quant_kernel[grid](x3, y3, R, K, inv_qmax,
                                 x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1),
                                 QMAX=qmax, FLOOR=floor, MANT=mant, EMIN=emin, TR=TR, BLOCK=block, TILE=tile,
                                 num_warps=4 if TR * block <= 4096 else 8)
    return y3.reshape(x.shape)
