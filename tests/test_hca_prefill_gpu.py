"""HCA prefill kernel on the GPU at lengths where every stage runs (skipped without CUDA): each config of the
autotune list, forced with cfg=, against the naive twin (fp64 reference, bf16 twin as the yardstick, as in
tests/kernels_cases.py); forward + gradients through the autotuned path. tests/kernels_cases.py's GPU shapes stop
before the mask-free compressed loop (it needs (t + 1) // ratio >= BLOCK_S)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


def _inputs(B, T, H, D, S, dtype, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).cuda().to(dtype).requires_grad_(grad)  # noqa: E731
    return mk(B, T, H, D), mk(B, T, D), mk(B, S, D), torch.randn(H, generator=g).cuda().requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_every_prefill_config_matches_naive(dtype):
    from dsv4_lab.kernels._common import INTERPRET
    from dsv4_lab.kernels.hca_attn.naive import hca_attn_naive
    from dsv4_lab.kernels.hca_attn.triton import _fwd_configs, hca_attn_fwd
    assert not INTERPRET
    B, T, H, D, W, R = 1, 4096, 16, 128, 128, 16                     # nvis_lo up to 256: 4 mask-free tiles of 64
    q, kv, comp, sink = _inputs(B, T, H, D, T // R, dtype)
    ref, ref_lse = hca_attn_naive(q.double(), kv.double(), comp.double(), sink.double(), D ** -0.5, W, R,
                                  return_lse=True)
    yard = hca_attn_naive(q, kv, comp, sink, D ** -0.5, W, R)
    for c in _fwd_configs():
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        o, lse = hca_attn_fwd(q, kv, comp, sink, D ** -0.5, W, R, cfg=cfg)
        e, lim = _rel(o, ref), 2 * _rel(yard, ref) + 2e-3
        assert e <= lim, f"{cfg}: rel err {e:.2e} > {lim:.2e}"
        assert (lse.double() - ref_lse).abs().max().item() < 2e-2, cfg


def test_prefill_fwd_bwd_long_matches_naive():
    from dsv4_lab.kernels.hca_attn.naive import hca_attn_naive
    from dsv4_lab.kernels.hca_attn.triton import hca_attn_triton
    B, T, H, D, W, R = 2, 3000, 16, 128, 128, 16
    q, kv, comp, sink = _inputs(B, T, H, D, T // R, torch.bfloat16, grad=True, seed=1)
    go = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    leaves = [q, kv, comp, sink]
    o = hca_attn_triton(q, kv, comp, sink, D ** -0.5, W, R)
    gr = torch.autograd.grad(o, leaves, go)
    ref_in = [t.detach().double().requires_grad_(True) for t in leaves]
    o_r = hca_attn_naive(*ref_in[:3], ref_in[3], D ** -0.5, W, R)
    gr_r = torch.autograd.grad(o_r, ref_in, go.double())
    y_in = [t.detach().clone().requires_grad_(True) for t in leaves]
    o_y = hca_attn_naive(*y_in[:3], y_in[3], D ** -0.5, W, R)
    gr_y = torch.autograd.grad(o_y, y_in, go)
    assert _rel(o, o_r) <= 2 * _rel(o_y, o_r) + 2e-3
    for nm, a, r, y in zip(["dq", "dkv", "dcomp", "dsink"], gr, gr_r, gr_y):
        e, lim = _rel(a, r), 2 * _rel(y, r) + 8e-3
        assert e <= lim, f"{nm}: rel err {e:.2e} > {lim:.2e}"
