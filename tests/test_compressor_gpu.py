"""The compressor's one-GEMM projection on CUDA (attention/compressor.py `_apply`, `project`; skipped without CUDA):
moved to CUDA, wkv's and wgate's weights share one storage, so a projection without autograd is one GEMM over
[wkv; wgate] that always reads the current weights (there is no copy to go stale), and anything that moves a weight
out of that storage turns the path off."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("GPU tests do not run under the Triton interpreter", allow_module_level=True)

from dsv4_lab.attention.compressor import Compressor  # noqa: E402
from dsv4_lab.layers import linear_f32  # noqa: E402
from numerics import gemm_order_bound  # noqa: E402

D, CH, M = 256, 64, 4


def _module(overlap=True, dtype=torch.bfloat16):
    torch.manual_seed(0)
    comp = Compressor(D, CH, M, overlap=overlap)
    with torch.no_grad():
        for p in comp.parameters():
            p.normal_()
    return comp, {k: v.clone() for k, v in comp.state_dict().items()}


def _two_gemms(comp, u):
    return linear_f32(u, comp.wkv.weight), linear_f32(u, comp.wgate.weight)


def _close(a, b, u, w):
    """|a - b| within the summation-order bound of two fp32 GEMMs of the same bf16 operands (numerics)."""
    return bool(((a - b).abs() <= gemm_order_bound(u, w)).all())


@pytest.mark.parametrize("overlap", [True, False])
def test_moved_to_cuda_the_weights_share_one_storage_with_the_same_values(overlap):
    comp, sd = _module(overlap)
    n_params = sum(p.numel() for p in comp.parameters())
    comp = comp.to("cuda", torch.bfloat16)
    both = comp._both_weights()
    assert both is not None and both.shape == (2 * comp.wkv.weight.shape[0], D)
    assert comp.wgate.weight.data_ptr() == comp.wkv.weight.data_ptr() + comp.wkv.weight.numel() * 2
    assert sum(p.numel() for p in comp.parameters()) == n_params
    assert len(list(comp.parameters())) == 4                     # wkv, wgate, ape, norm: still four
    got = comp.state_dict()
    assert list(got) == list(sd) and all(torch.equal(got[k].cpu(), v.to(torch.bfloat16)) for k, v in sd.items())
    assert comp.to("cuda")._both_weights() is both                # a no-op move keeps the storage
    assert comp.float()._both_weights() is not None              # a dtype change places the new weights together
    assert comp.cpu()._both is None                              # on the CPU nothing is placed


def test_one_gemm_projection_equals_the_two_and_reads_the_current_weights():
    comp, _ = _module()
    comp = comp.to("cuda", torch.bfloat16)
    u = torch.randn(2, 37, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        C, Z = comp.project(u)                                   # the one-GEMM path
        C2, Z2 = _two_gemms(comp, u)
        assert C.shape == C2.shape == (2, 37, 2 * CH) and Z.shape == Z2.shape
        assert _close(C, C2, u, comp.wkv.weight) and _close(Z, Z2, u, comp.wgate.weight)
        comp.wgate.weight.data.mul_(-2.0)                        # in place through .data: no version bump
        comp.wkv.weight.add_(1.0)                                # in place: an optimizer step
        C, Z = comp.project(u)
        C2, Z2 = _two_gemms(comp, u)
        assert _close(C, C2, u, comp.wkv.weight) and _close(Z, Z2, u, comp.wgate.weight)
        comp.wgate.weight.data = comp.wgate.weight.data.clone()  # moved out of the shared storage
        assert comp._both_weights() is None
        comp.wgate.weight.mul_(0.5)
        C, Z = comp.project(u)                                   # two GEMMs again, on the current weights
        assert torch.equal(Z, linear_f32(u, comp.wgate.weight)) and torch.equal(C, linear_f32(u, comp.wkv.weight))


def test_with_autograd_both_weights_get_their_gradients():
    comp, _ = _module()
    comp = comp.to("cuda", torch.bfloat16)
    u = torch.randn(1, 16, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    C, Z = comp.project(u)
    (C.square().sum() + 3 * Z.sum()).backward()
    gk, gg = comp.wkv.weight.grad, comp.wgate.weight.grad
    assert gk is not None and gg is not None and gk.shape == comp.wkv.weight.shape
    ones = torch.ones(1, 16, gg.shape[0], device="cuda")
    assert torch.allclose(gg.float(), 3 * (ones.transpose(1, 2) @ u.detach().float())[0], rtol=2e-2, atol=1e-1)


def test_module_forward_on_the_one_gemm_path_matches_the_two_gemm_path():
    comp, _ = _module()
    comp = comp.to("cuda", torch.bfloat16)
    from dsv4_lab.rope import RotaryTable
    rope = RotaryTable(16, 64, 10000.0).cuda()
    u = torch.randn(1, 64, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        a = comp(u, rope)
        comp._both = None                                        # the two-GEMM path on the same weights
        b = comp(u, rope)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
