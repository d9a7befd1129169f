"""Low precision (docs §8): FP8 E4M3 and MXFP4 fake quantisers, packed MXFP4, FP4 -> FP8 tile absorption, QAT.

One idea per file: fp8.py (E4M3 + UE8M0 block scales), mxfp4.py (E2M1 + E8M0 per 32, packing), fp4_to_fp8.py
(lossless 128 x 128 absorption and its condition), qat.py (what the model calls). Exact rounding rules are in each
file's docstring; GPU kernels must match these reference functions bit for bit.
"""
from .fp4_to_fp8 import (FP4ToFP8, dequantize_fp8_tiles, fake_quant_mxfp4_fp8_weight,
                         fake_quant_mxfp4_fp8_weight_ref, fp4_to_fp8_lossless)
from .fp8 import (FP8_MAX, fake_quant_fp8, fake_quant_fp8_ref, fake_quant_fp8_weight, fake_quant_fp8_weight_ref,
                  fp8_quantize, ste)
from .mxfp4 import (E2M1_GRID, FP4_MAX, fake_quant_mxfp4, fake_quant_mxfp4_ref, mxfp4_dequantize, mxfp4_quantize)
from .qat import fake_quant_kv, qat_linear, qat_weight

__all__ = ["FP8_MAX", "FP4_MAX", "E2M1_GRID", "fake_quant_fp8", "fake_quant_fp8_ref", "fake_quant_fp8_weight",
           "fake_quant_fp8_weight_ref", "fp8_quantize", "fake_quant_mxfp4", "fake_quant_mxfp4_ref", "mxfp4_quantize",
           "mxfp4_dequantize", "fp4_to_fp8_lossless", "dequantize_fp8_tiles", "FP4ToFP8",
           "fake_quant_mxfp4_fp8_weight", "fake_quant_mxfp4_fp8_weight_ref", "qat_linear", "qat_weight",
           "fake_quant_kv", "ste"]
