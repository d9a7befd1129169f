"""Compressor.project's one-GEMM path on the CPU (the placement itself happens on CUDA only: test_compressor_gpu.py):
with wkv's and wgate's weights laid out in one storage by hand as `_apply` lays them out on CUDA, a projection without
autograd is one GEMM over both; under a trace or with autograd it is two, and the pair is not even looked at."""
from __future__ import annotations

import pytest
import torch

from dsv4_lab.attention.compressor import Compressor
from dsv4_lab.layers import linear_f32
from numerics import gemm_order_bound

D, CH, M = 32, 8, 4


def _placed():
    """A bf16 compressor whose weights share one storage, with the `_both` record `_apply` keeps on CUDA."""
    torch.manual_seed(0)
    comp = Compressor(D, CH, M, overlap=True).bfloat16()
    assert comp._both is None                                   # on the CPU nothing is placed
    wk, wg = comp.wkv.weight, comp.wgate.weight
    with torch.no_grad():
        wk.normal_()
        wg.normal_()
    both = torch.cat([wk.detach(), wg.detach()])
    wk.data, wg.data = both[: wk.shape[0]], both[wk.shape[0]:]
    comp._both = (both, wk.data_ptr(), wg.data_ptr())
    return comp


def test_without_autograd_the_projection_is_one_gemm_over_both(monkeypatch):
    comp = _placed()
    u = torch.randn(2, 12, D).bfloat16()
    calls = []
    real = linear_f32
    monkeypatch.setattr("dsv4_lab.attention.compressor.linear_f32", lambda x, w: (calls.append(w.shape), real(x, w))[1])
    with torch.no_grad():
        C, Z = comp.project(u)
    assert calls == [(4 * CH, D)]                               # one GEMM, N = 2 k c
    assert C.shape == Z.shape == (2, 12, 2 * CH)
    assert bool(((C - real(u, comp.wkv.weight)).abs() <= gemm_order_bound(u, comp.wkv.weight)).all())
    assert bool(((Z - real(u, comp.wgate.weight)).abs() <= gemm_order_bound(u, comp.wgate.weight)).all())
    comp.wgate.weight.data = comp.wgate.weight.data.clone()     # a weight moved out: two GEMMs
    calls.clear()
    with torch.no_grad():
        comp.project(u)
    assert calls == [(2 * CH, D), (2 * CH, D)]


@pytest.mark.parametrize("case", ["autograd", "trace"])
def test_under_autograd_or_a_trace_two_gemms_and_the_pair_is_not_read(monkeypatch, case):
    comp = _placed()
    u = torch.randn(1, 8, D).bfloat16()
    monkeypatch.setattr(Compressor, "_both_weights", lambda self: pytest.fail("the pair was read"))
    calls = []
    real = linear_f32
    monkeypatch.setattr("dsv4_lab.attention.compressor.linear_f32", lambda x, w: (calls.append(w.shape), real(x, w))[1])
    if case == "trace":                                         # torch.compile: no data_ptr under a trace
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        with torch.no_grad():
            comp.project(u)
    else:
        C, Z = comp.project(u)
        (C.sum() + Z.sum()).backward()
        assert comp.wkv.weight.grad is not None and comp.wgate.weight.grad is not None
    assert calls == [(2 * CH, D), (2 * CH, D)]
