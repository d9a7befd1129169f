"""FP8 E4M3 fake quantisation with power-of-two (UE8M0) block scales (docs §8.1, §8.2, §6.3; REF `act_quant`).

Exact rules (a Triton kernel must reproduce these bit for bit; all arithmetic in fp32):

    block      the last dim is cut into blocks of `block` elements (1 x 128 for activations, 64 for KV); a last,
               partial block (K % block != 0) is its own block (same as zero padding: zeros never raise amax).
               `fake_quant_fp8_weight` uses 2-D tiles (128 x 128 on the last two dims, partial edge tiles likewise).
    amax       max |x| over the block, then amax = max(amax, 1e-4)
    r          r = amax * fp32(1/448)           (one fp32 multiply by the rounded reciprocal, as the reference)
    e          e = ceil(log2(r)) computed exactly from r's bits: biased exponent - 127, +1 if any mantissa bit is set
    scale      s = 2^e (UE8M0: stored as the byte e + 127)
    value      q = RNE_E4M3(clamp(x * 2^-e, -448, 448))   round to nearest E4M3, ties to even mantissa (the
               torch.float8_e4m3fn cast; checked on CPU in tests/test_quant.py)
    output     q * 2^e, returned in x's dtype (exact in bf16 / fp32: E4M3 has 3 mantissa bits)

Input is assumed finite. `fake_quant_fp8*` pass gradients straight through (identity); the `*_ref` functions are
the pure quantise-dequantise maps without autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.fake_quant import fake_quant, ste  # noqa: F401  (ste: re-exported for the quantisers of this package)

FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4


# --- power-of-two scales, exactly as the reference's fast_log2_ceil / fast_pow2 ---------------------------------

def ceil_log2(r: torch.Tensor) -> torch.Tensor:
    """ceil(log2(r)) for positive normal fp32 r, from the bits (exact; no log2 rounding). Returns int32."""
    bits = r.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    man = bits & ((1 << 23) - 1)
    return (exp - 127 + (man != 0).to(torch.int32)).to(torch.int32)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e in [-126, 127], built from the bits (exact)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def pow2_exponent(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """e with 2^e = the UE8M0 scale: ceil(log2(max(amax, floor) * fp32(1/qmax))). int32."""
    inv = torch.tensor(1.0 / qmax, dtype=torch.float32)                 # the fp32-rounded reciprocal
    return ceil_log2(amax.float().clamp_min(floor) * inv)


# --- block views ---------------------------------------------------------------------------------------------------

def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., K) -> (..., ceil(K/block), block), zero-padding a partial last block."""
    K = x.shape[-1]
    pad = (-K) % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (K + pad) // block, block)


def from_blocks(xb: torch.Tensor, K: int) -> torch.Tensor:
    return xb.reshape(*xb.shape[:-2], -1)[..., :K]


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """clamp to [-448, 448] then round to nearest E4M3, ties to even; returned as fp32 values."""
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


# --- quantisers ----------------------------------------------------------------------------------------------------

def fp8_quantize(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K) torch.float8_e4m3fn, e (..., ceil(K/block)) int32) with x ~ q * 2^e per block."""
    xb = to_blocks(x.float(), block)                                    # (..., nb, block)
    e = pow2_exponent(xb.abs().amax(-1), FP8_MAX, FP8_AMAX_FLOOR)       # (..., nb)
    q = (xb * pow2(-e)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return from_blocks(q.view(torch.uint8), x.shape[-1]).view(torch.float8_e4m3fn), e


def fake_quant_fp8_ref(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantise-dequantise along the last dim in blocks of `block` (no autograd). Same shape and dtype as x."""
    xb = to_blocks(x.float(), block)
    e = pow2_exponent(xb.abs().amax(-1), FP8_MAX, FP8_AMAX_FLOOR)[..., None]
    y = round_e4m3(xb * pow2(-e)) * pow2(e)
    return from_blocks(y, x.shape[-1]).to(x.dtype)


def fake_quant_fp8_weight_ref(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantise-dequantise in block x block tiles of the last two dims (weights [out, in]; leading dims = batch)."""
    R, C = w.shape[-2:]
    pr, pc = (-R) % block, (-C) % block
    wf = F.pad(w.float(), (0, pc, 0, pr)) if pr or pc else w.float()
    t = wf.reshape(*wf.shape[:-2], (R + pr) // block, block, (C + pc) // block, block)  # (..., nr, b, nc, b)
    e = pow2_exponent(t.abs().amax(dim=(-3, -1), keepdim=True), FP8_MAX, FP8_AMAX_FLOOR)
    y = (round_e4m3(t * pow2(-e)) * pow2(e)).reshape(wf.shape)
    return y[..., :R, :C].to(w.dtype)


def fake_quant_fp8(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 E4M3 fake quantisation along the last dim (1 x block, UE8M0 scales), straight-through gradient: what the
    model calls, through the kernel dispatcher (kernels/fake_quant: Triton on CUDA, its naive twin elsewhere; both
    bit-exact with fake_quant_fp8_ref)."""
    return fake_quant(x, "fp8", block)


def fake_quant_fp8_weight(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 E4M3 fake quantisation of a weight in block x block tiles, straight-through gradient (dispatcher as
    above; bit-exact with fake_quant_fp8_weight_ref)."""
    return fake_quant(w, "fp8", block, tile=True)
