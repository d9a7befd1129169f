"""Lossless FP4 -> FP8 absorption of MXFP4 weights into 128 x 128 FP8 tiles (docs §8.3; REF convert.py
`cast_e2m1fn_to_e4m3fn`; paper §5.2.1).

A weight [R, K] in MXFP4 has one scale 2^{e_i} per 1 x 32 sub-block. Per 128 x 128 tile (128 rows x 4 sub-blocks):

    e_max = max e_i over the tile's sub-blocks;  tile scale S = 2^{e_S}, e_S = e_max - 6   (byte e_S + 127)
    every FP4 value v of sub-block i becomes  E4M3( v * 2^{k_i} ),  k_i = e_i - e_S = e_i - e_max + 6

v * 2^k is an exact E4M3 number for every E2M1 v iff k in [-8, 6] (6 * 2^6 = 384 <= 448; 0.5 * 2^-8 = 2^-9 is the
smallest E4M3 subnormal), i.e. iff s_max / s_min <= 2^14 inside the tile. When a sub-block violates it, its small
values are rounded (RNE, possibly to 0): the conversion is lossy and `condition_ok` is False for that tile; `exact`
says whether the values actually survived (a violating sub-block of zeros, say, still converts exactly).
Partial edge tiles (R or K not multiples of 128) are tiles of what is there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fp8 import FP8_MAX, pow2, ste
from .mxfp4 import MX_BLOCK, e2m1_values, mxfp4_parts, mxfp4_unpack

TILE = 128
SUB = TILE // MX_BLOCK            # 4 sub-blocks of 32 per tile column
MAX_LOG2_RATIO = 14               # s_max / s_min <= 2^14 (docs §8.3)


@dataclass
class FP4ToFP8:
    fp8: torch.Tensor             # (..., R, K) torch.float8_e4m3fn: the values v * 2^{k_i}
    tile_scales: torch.Tensor     # (..., ceil(R/128), ceil(K/128)) uint8 E8M0 bytes e_S + 127
    log2_ratio: torch.Tensor      # (..., nR, nC) int: log2(s_max / s_min) over the tile's sub-blocks
    condition_ok: torch.Tensor    # (..., nR, nC) bool: log2_ratio <= 14 (the docs §8.3 sufficient condition)
    exact: torch.Tensor           # (..., nR, nC) bool: FP8 tile dequantises to exactly the FP4 values

    @property
    def lossless(self) -> bool:
        return bool(self.exact.all())

    def report(self) -> dict:
        n = self.condition_ok.numel()
        return {"tiles": n, "condition_violations": int((~self.condition_ok).sum()),
                "inexact_tiles": int((~self.exact).sum()), "max_log2_ratio": int(self.log2_ratio.max()),
                "lossless": self.lossless}


def _tile_reduce(e: torch.Tensor, R: int, op: str) -> torch.Tensor:
    """e (..., R, nb) sub-block exponents -> (..., ceil(R/128), ceil(nb/4)) max or min per tile."""
    nb = e.shape[-1]
    pad_val = float("-inf") if op == "max" else float("inf")
    ef = F.pad(e.float(), (0, (-nb) % SUB, 0, (-R) % TILE), value=pad_val)
    t = ef.reshape(*ef.shape[:-2], ef.shape[-2] // TILE, TILE, ef.shape[-1] // SUB, SUB)
    return t.amax(dim=(-3, -1)) if op == "max" else t.amin(dim=(-3, -1))


def _expand_tiles(t: torch.Tensor, R: int, nb: int) -> torch.Tensor:
    """(..., nR, nC) per-tile -> (..., R, nb) per-sub-block."""
    return t.repeat_interleave(TILE, -2)[..., :R, :].repeat_interleave(SUB, -1)[..., :nb]


def convert_parts(q: torch.Tensor, e: torch.Tensor):
    """Core: FP4 grid values q (..., R, K) and sub-block exponents e (..., R, ceil(K/32)) -> (fp8 values as fp32
    (..., R, K), tile exponents e_S (..., nR, nC) int32, log2 ratio per tile)."""
    R, K = q.shape[-2:]
    nb = e.shape[-1]
    e_max = _tile_reduce(e, R, "max")
    e_min = _tile_reduce(e, R, "min")
    e_S = (e_max - 6).clamp(min=-127).to(torch.int32)                  # E8M0 has no exponent below -127
    k = e.to(torch.int32) - _expand_tiles(e_S, R, nb)                   # (..., R, nb)
    kk = k.repeat_interleave(MX_BLOCK, -1)[..., :K]
    # v * 2^k, in two exact fp32 multiplies so that 2^k never leaves the normal range
    y = q.float() * pow2((kk // 2).clamp(-126, 127)) * pow2((kk - kk // 2).clamp(-126, 127))
    v8 = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return v8, e_S, (e_max - e_min).to(torch.int32)


def _dequant_tiles(v8: torch.Tensor, e_S: torch.Tensor) -> torch.Tensor:
    R, K = v8.shape[-2:]
    s = pow2(e_S.clamp(min=-126))                                       # 2^-127 only for all-tiny tiles
    s = torch.where(e_S < -126, s / 2, s)
    return v8.float() * s.repeat_interleave(TILE, -2)[..., :R, :].repeat_interleave(TILE, -1)[..., :K]


def dequantize_fp8_tiles(fp8: torch.Tensor, tile_scales: torch.Tensor) -> torch.Tensor:
    """(fp8 (..., R, K) E4M3, tile_scales (..., nR, nC) uint8 E8M0) -> fp32 values."""
    return _dequant_tiles(fp8, tile_scales.to(torch.int32) - 127)


def fp4_to_fp8_lossless(codes: torch.Tensor, scales: torch.Tensor) -> FP4ToFP8:
    """Packed MXFP4 weight (codes (..., R, K/2) uint8, scales (..., R, K/32) uint8 E8M0, from mxfp4_quantize) ->
    FP8 E4M3 with one E8M0 scale per 128 x 128 tile, plus the per-tile lossless report (docs §8.3)."""
    q = e2m1_values(mxfp4_unpack(codes))
    e = scales.to(torch.int32) - 127
    v8, e_S, ratio = convert_parts(q, e)
    ref = q * pow2(e).repeat_interleave(MX_BLOCK, -1)
    back = _dequant_tiles(v8, e_S)
    R, K = q.shape[-2:]
    mism = F.pad((back != ref).float(), (0, (-K) % TILE, 0, (-R) % TILE))
    exact = mism.reshape(*mism.shape[:-2], mism.shape[-2] // TILE, TILE, mism.shape[-1] // TILE, TILE) \
        .amax(dim=(-3, -1)) == 0
    return FP4ToFP8(v8, (e_S + 127).to(torch.uint8), ratio, ratio <= MAX_LOG2_RATIO, exact)


def fake_quant_mxfp4_fp8_weight_ref(w: torch.Tensor) -> torch.Tensor:
    """The QAT weight path of routed experts (docs §8.4): MXFP4 (1 x 32 along the input dim) then the FP4 -> FP8
    128 x 128 tile conversion; equals fake_quant_mxfp4(w) wherever the tile condition holds. No autograd."""
    if w.ndim < 2:
        raise ValueError(f"a weight (..., out, in) is needed, got shape {tuple(w.shape)}")
    q, e = mxfp4_parts(w)
    v8, e_S, _ = convert_parts(q, e)
    return _dequant_tiles(v8, e_S).to(w.dtype)


def fake_quant_mxfp4_fp8_weight(w: torch.Tensor) -> torch.Tensor:
    """MXFP4 -> FP8-tile fake quantisation of a weight with a straight-through gradient to the fp32 master."""
    return ste(w, fake_quant_mxfp4_fp8_weight_ref(w.detach()))
