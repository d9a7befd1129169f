"""Dense layers with the attention sink on the fused SDPA path (attention/core.dense_causal_attention): the same
numbers as the einsum reference `sink_attention` (tests/reference_attention.py): outputs and gradients of q, kv and
the sink, and no (T, T) tensor.

Error model: in fp64 both are exact softmax-weighted sums up to summation order (|diff| ~ 1e-15 relative). In fp32
the fused kernel's online softmax and the reference differ by O(D u) in each score and O(T u) in the normaliser
(u = 2^-24): 50 (D + T) u relative to max|o| holds with room to spare.
"""
import pytest
import torch

from dsv4_lab.attention.core import dense_causal_attention, window_mask
from reference_attention import sink_attention


def _inputs(B, T, H, D, dtype, sink_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    kv = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    sink = (torch.randn(H, generator=g, dtype=torch.float64) * sink_scale).to(dtype).requires_grad_()
    return q, kv, sink


def _fwd_bwd(fn, q, kv, sink):
    for t in (q, kv, sink):
        if t is not None:
            t.grad = None
    o = fn(q, kv, sink)
    w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    (o * w).sum().backward()
    return [o.detach()] + [t.grad.clone() for t in (q, kv, sink) if t is not None]


def _ref(scale):
    return lambda q, kv, sink: sink_attention(q, kv, window_mask(q.shape[1], None)[None], sink, scale)


FP64_CASES = [(1, 32, 1.0, True), (5, 32, 1.0, True), (33, 30, 1.0, True), (17, 16, 8.0, True), (17, 16, 1.0, False)]


def check_fp64(T, D, sink_scale, with_sink, seed: int = 0):
    """[(name, error, tolerance)]: fused SDPA path vs the einsum reference in fp64, outputs and gradients, relative to
    the reference's max (error model above: ~1e-15; bar 1e-12)."""
    q, kv, sink = _inputs(2, T, 4, D, torch.float64, sink_scale, seed)
    sink = sink if with_sink else None
    scale = D ** -0.5
    got = _fwd_bwd(lambda *a: dense_causal_attention(*a, scale), q, kv, sink)
    ref = _fwd_bwd(_ref(scale), q, kv, sink)
    name = f"dense sink SDPA fp64 T={T} D={D} sink={sink_scale if with_sink else None}"
    return [(name, max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)), 1e-12)]


@pytest.mark.parametrize("T,D,sink_scale,with_sink", FP64_CASES)
def test_dense_sink_sdpa_matches_reference_fp64(T, D, sink_scale, with_sink):
    for what, err, tol in check_fp64(T, D, sink_scale, with_sink):
        assert err <= tol, (what, err, tol)


def test_dense_sink_sdpa_fp32_no_quadratic_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    MaxNumel.biggest = max(MaxNumel.biggest, t.numel())
            return out

    B, T, H, D = 1, 512, 2, 32
    q, kv, sink = _inputs(B, T, H, D, torch.float32)
    scale = D ** -0.5
    MaxNumel.biggest = 0
    with MaxNumel():
        got = _fwd_bwd(lambda *a: dense_causal_attention(*a, scale), q, kv, sink)
    assert MaxNumel.biggest < T * T                           # largest tensor: q / grads, (B, T + 1, H, D + 8)
    MaxNumel.biggest = 0
    with MaxNumel():                                          # the control: the reference builds (B, H, T, T + 1)
        _fwd_bwd(_ref(scale), q, kv, sink)
    assert MaxNumel.biggest >= B * H * T * T
    for what, err, tol in check_fp32(seed=0, got=got):
        assert err <= tol, (what, err, tol)


def check_fp32(seed: int = 0, got=None):
    """[(name, error, tolerance)]: the fused fp32 path (T = 512) vs the fp64 reference, outputs and gradients,
    relative to the reference's max, bar 50 (D + T) u32 (error model above)."""
    B, T, H, D = 1, 512, 2, 32
    q, kv, sink = _inputs(B, T, H, D, torch.float32, seed=seed)
    scale = D ** -0.5
    if got is None:
        got = _fwd_bwd(lambda *a: dense_causal_attention(*a, scale), q, kv, sink)
    ref = _fwd_bwd(_ref(scale), *(t.detach().double().requires_grad_() for t in (q, kv, sink)))
    tol = 50 * (D + T) * 2.0 ** -24
    return [("dense sink SDPA fp32 T=512 vs fp64",
             max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)), tol)]
