"""The kernel cases of tests/kernels_cases.py at real sizes on a CUDA GPU, fp32 and bf16 (skipped without CUDA).

bf16 tolerance rule (kernels.md §9.1 item 6): the kernel's error against an fp64 reference must be within 2x the
error of the naive twin run in bf16, plus 2e-3.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("GPU tests do not run under the Triton interpreter", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_cases as kc  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(kc.CASES))
def test_kernel_gpu(op, dtype):
    if op == "fake_quant" and dtype == torch.bfloat16:
        pytest.skip("fake_quant covers fp32 and bf16 inside one case")
    kc.CASES[op]("cuda", True, dtype)
