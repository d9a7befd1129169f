"""FP8 (E4M3, UE8M0 block scales) and MXFP4 (E2M1, E8M0 per 32) fake quantisation, naive twin of triton.py.

Written from docs §8.1 (the rules are restated in dsv4_lab/quant/fp8.py and mxfp4.py; tests check this twin and
the Triton kernel against those reference functions bit for bit):

    amax = max(max|x| over the block, floor)          floor = 1e-4 (FP8) / 6 * 2^-126 (FP4)
    e    = ceil(log2(amax * fp32(1 / Qmax)))          from the fp32 bits, exact; Qmax = 448 / 6
    q    = RNE_grid(clamp(x * 2^-e, -Qmax, Qmax))     E4M3 grid / E2M1 grid, ties to even, sign kept (incl. -0)
    out  = q * 2^e in x's dtype

Blocks run along the last dim (`block` elements; a partial last block is its own block), or over 2-D tiles of the
last two dims (`tile=True`, block x block, the FP8 weight format). Rounding is done by the "magic number" trick
(|y| + 1.5 * 2^(u + 23)) - 1.5 * 2^(u + 23) with u = log2 of the grid spacing at |y|, which is exact fp32 RNE and
needs no float8 dtype, so the same arithmetic runs in the Triton interpreter (docs/kernels.md §7 rule 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FORMATS = {"fp8": (448.0, 1e-4, 3, -6), "fp4": (6.0, 6.0 * 2.0 ** -126, 1, 0)}   # Qmax, amax floor, mant bits, emin


def _pow2(e: torch.Tensor) -> torch.Tensor:
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _ceil_log2(r: torch.Tensor) -> torch.Tensor:
    bits = r.contiguous().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def round_grid(y: torch.Tensor, mant: int, emin: int, qmax: float) -> torch.Tensor:
    """RNE of fp32 y onto a float grid with `mant` mantissa bits and min normal exponent emin, clamped to qmax."""
    a = y.abs().clamp(max=qmax)
    ea = ((a.view(torch.int32) >> 23) & 0xFF) - 127                       # floor(log2 a) (-127 for 0)
    u = torch.clamp(ea, min=emin) - mant                                    # log2 of the grid spacing at a
    c = ((u + 23 + 127) << 23 | (1 << 22)).view(torch.float32)              # 1.5 * 2^(u + 23)
    r = (a + c) - c
    return torch.where(y.view(torch.int32) < 0, -r, r)


def fake_quant_naive(x: torch.Tensor, fmt: str = "fp8", block: int = 128, tile: bool = False) -> torch.Tensor:
    if fmt not in FORMATS:
        raise ValueError(f"fake_quant: fmt={fmt!r} is not allowed: one of {sorted(FORMATS)}")
    qmax, floor, mant, emin = FORMATS[fmt]
    xf = x.float()
    K = x.shape[-1]
    pc = (-K) % block
    if tile:
        R = x.shape[-2]
        pr = (-R) % block
        xp = F.pad(xf, (0, pc, 0, pr))
        t = xp.reshape(*xp.shape[:-2], (R + pr) // block, block, (K + pc) // block, block)
        amax = t.abs().amax(dim=(-3, -1), keepdim=True)
    else:
        xp = F.pad(xf, (0, pc))
        t = xp.reshape(*xp.shape[:-1], (K + pc) // block, block)
        amax = t.abs().amax(-1, keepdim=True)
    e = _ceil_log2(amax.clamp_min(floor) * torch.tensor(1.0 / qmax, dtype=torch.float32))
    y = round_grid(t * _pow2(-e), mant, emin, qmax) * _pow2(e)
    y = y.reshape(xp.shape)
    y = y[..., :x.shape[-2], :K] if tile else y[..., :K]
    return y.to(x.dtype)
