"""apply_rope (dsv4_lab/rope.py, docs §2.6): the eager path's complex multiply gives the real-form rotation
x'_2k = x_2k cos - x_2k+1 sin, x'_2k+1 = x_2k sin + x_2k+1 cos (the form the compiled path keeps), forward and
backward, for (B, T, D) and (B, T, H, D) inputs, inverse rotation, bf16 / fp32 / fp64, non-contiguous inputs and
(B, T) positions; the non-RoPE dims pass through untouched.

Error model (M = max|x|, u = 2^-24 fp32, 2^-53 fp64). Each output is x0 c - x1 s (or x0 s + x1 c) with
c^2 + s^2 = 1: the two products err by at most u (|x0 c| + |x1 s|) <= sqrt(2) u M together and the sum by
u |result| <= sqrt(2) u M, so either form is within 2 sqrt(2) u M of the exact rotation whatever the order or an FMA
(which only removes a rounding), and the two forms within 4 sqrt(2) u M = 5.66 u M: the bar is 6 u M. The backward
rotates the upstream gradient g by the opposite angle: the same model with max|g|. bf16 inputs are rotated in fp32 and
rounded to bf16 once, a rounding bucket that a reassociated fp32 result could flip: the bf16 path is asserted bit for
bit equal to the fp32 path on the same (bf16-valued) input rounded to bf16, forward and backward (identical fp32
values reach the rounding), and that fp32 path is held to the model.
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


U = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
BAR = 6                                                                       # x u M (module docstring)
SHAPES = [(2, 37, 24), (2, 37, 3, 24), (2, 37, 5, 16)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def check_rotation(dtype, shape, inverse: bool, seed: int = 0):
    """Rows: the eager (complex) path against the real form, forward and backward, with bars from the model; for
    bf16 those of its fp32 path, after asserting bf16 == fp32 path rounded, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    tab = RotaryTable(16, 64, 10000.0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype).requires_grad_()
    pos = (torch.randint(0, 64, (shape[0], shape[1]), generator=gen) if len(shape) == 4
           else torch.arange(shape[1]) + 5)
    cos, sin = tab.cos[pos], tab.sin[pos]
    got = apply_rope(x, cos, sin, inverse)
    assert torch.equal(got[..., :-16], x[..., :-16])                        # non-RoPE dims untouched
    g = torch.randn(got.shape, generator=gen).to(dtype)
    (gx,) = torch.autograd.grad(got, x, g)
    if dtype == torch.bfloat16:                                             # rounded once from the fp32 path
        x32 = x.detach().float().requires_grad_()
        got32 = apply_rope(x32, cos, sin, inverse)
        (gx32,) = torch.autograd.grad(got32, x32, g.float())
        assert torch.equal(got, got32.to(dtype)) and torch.equal(gx, gx32.to(dtype))
        x, got, g, gx = x32, got32, g.float(), gx32
    ref = real_form(x, cos, sin, inverse)
    (rx,) = torch.autograd.grad(ref, x, g)
    u, name = U[x.dtype], f"RoPE complex = real form {str(dtype)[6:]} {shape} inverse={inverse}"
    return [(f"{name} forward", (got.double() - ref.double()).abs().max().item(),
             BAR * u * x.detach().abs().max().double().item()),
            (f"{name} backward", (gx.double() - rx.double()).abs().max().item(),
             BAR * u * g.abs().max().double().item())]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inverse", [False, True])
def test_complex_rotation_is_the_real_form(dtype, shape, inverse):
    for what, err, tol in check_rotation(dtype, shape, inverse):
        assert err <= tol, (what, err, tol)


def check_non_contiguous(seed: int = 0):
    gen = torch.Generator().manual_seed(1 + seed)
    tab = RotaryTable(8, 32, 10000.0)
    x = torch.randn(3, 4, 20, 12, generator=gen).transpose(1, 2)            # (B, T, H, D), strides not row-major
    pos = torch.arange(20)
    got, ref = apply_rope(x, tab.cos[pos], tab.sin[pos]), real_form(x, tab.cos[pos], tab.sin[pos])
    return [("RoPE complex = real form, non-contiguous input", (got - ref).abs().max().item(),
             BAR * U[torch.float32] * x.abs().max().item())]


def test_non_contiguous_input():
    for what, err, tol in check_non_contiguous():
        assert err <= tol, (what, err, tol)
