"""apply_rope (dsv4_lab/rope.py, docs §2.6): the eager path's complex multiply gives the real-form rotation
x'_2k = x_2k cos - x_2k+1 sin, x'_2k+1 = x_2k sin + x_2k+1 cos (the form the compiled path keeps), forward and
backward, for (B, T, D) and (B, T, H, D) inputs, inverse rotation, bf16 / fp32 / fp64, non-contiguous inputs and
(B, T) positions; the non-RoPE dims pass through untouched.

Error model: each output is a x c +- b x s of fp32 (fp64) numbers with |c|, |s| <= 1: two products and one sum,
at most 3 roundings of size u |x| (u = 2^-24 fp32, 2^-53 fp64) whatever the order or an FMA, so the two forms agree
within 3 u max|x|; the bar is 4 u max|x|. bf16 inputs are rotated in fp32 and rounded to bf16 once: the forms agree
within one bf16 ulp (2^-7 relative) of the output.
"""
import pytest
import torch

from dsv4_lab.rope import RotaryTable, apply_rope


def real_form(x, cos, sin, inverse=False):
    r = cos.shape[-1] * 2
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    ct = torch.promote_types(x.dtype, torch.float32)
    xr = x[..., -r:].to(ct).unflatten(-1, (r // 2, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    out = torch.stack((x0 * cos.to(ct) - x1 * sin.to(ct), x0 * sin.to(ct) + x1 * cos.to(ct)), -1).flatten(-2)
    return torch.cat((x[..., :-r], out.to(x.dtype)), -1)


U = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 24), (2, 37, 3, 24), (2, 37, 5, 16)])
@pytest.mark.parametrize("inverse", [False, True])
def test_complex_rotation_is_the_real_form(dtype, shape, inverse):
    torch.manual_seed(0)
    tab = RotaryTable(16, 64, 10000.0)
    x = (torch.randn(*shape) * 3).to(dtype).requires_grad_()
    pos = torch.randint(0, 64, (shape[0], shape[1])) if len(shape) == 4 else torch.arange(shape[1]) + 5
    cos, sin = tab.cos[pos], tab.sin[pos]
    got, ref = apply_rope(x, cos, sin, inverse), real_form(x, cos, sin, inverse)
    scale = x.detach().abs().max().double().item()
    tol = 4 * U[dtype] * scale if dtype != torch.bfloat16 else U[dtype] * got.detach().abs().max().double().item()
    assert torch.equal(got[..., :-16], x[..., :-16])                        # non-RoPE dims untouched
    assert (got.double() - ref.double()).abs().max().item() <= tol
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    gscale = g.abs().max().double().item()
    gtol = 4 * U[dtype] * gscale if dtype != torch.bfloat16 else U[dtype] * rx.abs().max().double().item()
    assert (gx.double() - rx.double()).abs().max().item() <= gtol


def test_non_contiguous_input():
    torch.manual_seed(1)
    tab = RotaryTable(8, 32, 10000.0)
    x = torch.randn(3, 4, 20, 12).transpose(1, 2)                          # (B, T, H, D), strides not row-major
    pos = torch.arange(20)
    got, ref = apply_rope(x, tab.cos[pos], tab.sin[pos]), real_form(x, tab.cos[pos], tab.sin[pos])
    assert (got - ref).abs().max().item() <= 4 * U[torch.float32] * x.abs().max().item()
