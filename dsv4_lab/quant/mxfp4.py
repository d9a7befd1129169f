"""MXFP4: E2M1 values with one E8M0 power-of-two scale per 32 elements (docs §8.1; REF `fp4_act_quant`).

Exact rules (all arithmetic in fp32; a Triton kernel must reproduce them bit for bit):

    block      32 consecutive elements of the last dim (the input dim of a weight [out, in]); a partial last block
               (K % 32 != 0) is its own block in the fake quantiser (the packed format needs K % 32 == 0)
    amax       max |x| over the block, then amax = max(amax, 6 * 2^-126)
    e          e = ceil(log2(amax * fp32(1/6))), exact from the bits (fp8.ceil_log2); scale s = 2^e, byte e + 127
    y          y = clamp(x * 2^-e, -6, 6)
    value      q = sign(y) * RNE_grid(|y|) on the E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}: round to the nearest
               grid point, a tie goes to the point with even mantissa bit (= even code), i.e.
                   |y| < 2 :  round_half_even(2|y|) / 2
                   |y| < 4 :  round_half_even(|y|)
                   else    :  round_half_even(|y| / 2) * 2
               (ties: .25->0, .75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4). The sign is x's sign bit.
    output     q * 2^e in x's dtype (exact in bf16)

Codes (docs §8.1): code = sign << 3 | index of |q| in the magnitude list; packed two per byte along the last dim,
low nibble = even element, high nibble = odd element (torch.float4_e2m1fn_x2 layout). Scales: uint8 = e + 127.
"""
from __future__ import annotations

import torch

from ..kernels.fake_quant import fake_quant
from .fp8 import from_blocks, pow2, pow2_exponent, to_blocks

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126
MX_BLOCK = 32


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Clamp to [-6, 6] and round to the E2M1 grid, ties to even (see the module docstring). fp32 values."""
    a = y.float().abs().clamp(max=FP4_MAX)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.where(torch.signbit(y), -q, q)


def mxfp4_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K) E2M1 grid values as fp32, e (..., ceil(K/32)) int32 scale exponents)."""
    xb = to_blocks(x.float(), MX_BLOCK)                                 # (..., nb, 32)
    e = pow2_exponent(xb.abs().amax(-1), FP4_MAX, FP4_AMAX_FLOOR)       # (..., nb)
    q = round_e2m1(xb * pow2(-e)[..., None])
    return from_blocks(q, x.shape[-1]), e


def fake_quant_mxfp4_ref(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 quantise-dequantise along the last dim (no autograd); same shape and dtype as x."""
    q, e = mxfp4_parts(x)
    y = to_blocks(q, MX_BLOCK) * pow2(e)[..., None]
    return from_blocks(y, x.shape[-1]).to(x.dtype)


def fake_quant_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 fake quantisation along the last dim with a straight-through gradient, through the kernel dispatcher
    (kernels/fake_quant; bit-exact with fake_quant_mxfp4_ref)."""
    return fake_quant(x, "fp4", MX_BLOCK)


# --- packed storage ------------------------------------------------------------------------------------------------

def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """E2M1 grid values -> 4-bit codes (uint8 0..15): sign << 3 | magnitude index."""
    a = q.abs()
    idx = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4)).to(torch.uint8)
    return idx | (torch.signbit(q).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 0..15) -> fp32 values (code 8 = -0.0)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    mag = grid[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def mxfp4_pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K), any K -> (codes (..., ceil(K/2)) uint8, low nibble = even element, a zero nibble after an odd K;
    scales (..., ceil(K/32)) uint8 E8M0, a partial last block scaled by its own entries)."""
    q, e = mxfp4_parts(x)
    c = e2m1_codes(q)
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return c[..., 0::2] | (c[..., 1::2] << 4), (e + 127).to(torch.uint8)


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K), K % 32 == 0 -> (codes (..., K/2) uint8, low nibble = even element; scales (..., K/32) uint8 E8M0)."""
    K = x.shape[-1]
    if K % MX_BLOCK:
        raise ValueError(f"mxfp4_quantize: last dim = {K} is not allowed: a multiple of {MX_BLOCK} (packed MXFP4); "
                         "use fake_quant_mxfp4 for partial blocks")
    return mxfp4_pack(x)


def mxfp4_unpack(codes: torch.Tensor) -> torch.Tensor:
    """(..., K/2) packed bytes -> (..., K) 4-bit codes."""
    lo, hi = codes & 0xF, codes >> 4
    return torch.stack([lo, hi], -1).flatten(-2)


def mxfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of mxfp4_quantize: (codes (..., K/2), scales (..., K/32)) -> values (..., K)."""
    v = to_blocks(e2m1_values(mxfp4_unpack(codes)), MX_BLOCK)
    y = v * pow2(scales.to(torch.int32) - 127)[..., None]
    return y.flatten(-2).to(dtype)
