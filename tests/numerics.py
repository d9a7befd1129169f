"""Numerical comparisons shared by the tests and scripts/tolerance_margins.py, so both measure the same check.

Every `check_*` function takes a seed and returns a list of (name, error, tolerance) triples; the tests assert
error <= tolerance, the script reports max over seeds of error / tolerance. The error model behind each tolerance is
written beside it. Unit roundoffs: u32 = 2^-24 (fp32), u_bf16 = 2^-9, u_fp8 = 2^-4 (E4M3, 3 mantissa bits).

Discrete decisions (quantisation buckets, top-k, routing) must not decide a test: `replayed_quantizers` makes the
second of two runs take each quantiser decision on the first run's input (identical inputs), so fp32 summation order
cannot flip a bucket, and counts how many decisions it would have flipped.
"""
from __future__ import annotations

import contextlib

import torch

U32, U_BF16, U_FP8 = 2.0 ** -24, 2.0 ** -9, 2.0 ** -4


# ------------------------------------------------------------------------------------------------ quantiser replay
@contextlib.contextmanager
def replayed_quantizers(match: float = 1e-5):
    """Quantiser decisions taken on identical inputs in two runs of the same model (e.g. full vs cached forward).

    Within the block, the fake quantisers the model calls on activations (FP8 activations / KV via
    dsv4_lab.quant.qat, MXFP4 indexer q / k via dsv4_lab.quant; weights are the same tensors in both runs) quantise
    rows of their input's last dim. While book["record"] is True each call's (input rows, output rows) are kept; after
    it is set False, each input row is matched to its nearest recorded row of the same quantiser and width, and if
    they agree within `match` relative (fp32 reassociation leaves ~1e-7; rows of different tokens differ by O(1))
    the recorded output is returned: the decision was taken on the first run's input, so summation order cannot flip
    a bucket. Rows without a match keep their own quantisation (a wiring bug still shows). Counters: rows seen,
    rows matched, and rows whose own decision differed from the replayed one ("flipped")."""
    import dsv4_lab.quant as Q
    import dsv4_lab.quant.qat as QAT
    book = {"record": True, "rows": 0, "matched": 0, "flipped": 0, "store": {}}

    def wrap(fn, name):
        def replay(x, *a):
            y = fn(x, *a)
            with torch.no_grad():
                w = x.shape[-1]
                xs, ys = x.detach().reshape(-1, w).float(), y.detach().reshape(-1, w)
                key = (name, w) + a
                if book["record"]:
                    book["store"].setdefault(key, []).append((xs, ys))
                    return y
                if not isinstance(book["store"].get(key), tuple):       # first replayed call: stack the records
                    rec = book["store"].get(key) or [(xs[:0], ys[:0])]
                    book["store"][key] = (torch.cat([r[0] for r in rec]).double(), torch.cat([r[1] for r in rec]))
                X, Y = book["store"][key]
                book["rows"] += xs.shape[0]
                if X.shape[0] == 0:
                    return y
                d, j = torch.cdist(xs.double(), X).min(1)
                ok = d <= match * xs.double().norm(dim=1).clamp_min(1e-30)
                book["matched"] += int(ok.sum())
                book["flipped"] += int((ok & (Y[j] != ys).any(1)).sum())
                out = torch.where(ok[:, None], Y[j], ys).view_as(y)
            return out if not x.requires_grad else x + (out - x).detach()
        return replay

    saved = QAT.fake_quant_fp8, Q.fake_quant_mxfp4
    QAT.fake_quant_fp8, Q.fake_quant_mxfp4 = wrap(saved[0], "fp8"), wrap(saved[1], "mxfp4")
    try:
        yield book
    finally:
        QAT.fake_quant_fp8, Q.fake_quant_mxfp4 = saved


# ------------------------------------------------------------------------------------------------ allclose as a row
def close_err(a, b, atol: float, rtol: float = 1e-5):
    """(error, tolerance) of torch.allclose(a, b, atol=atol, rtol=rtol) (rtol defaults to allclose's 1e-5): |a - b|
    and the bound atol + rtol |b| at the element where their ratio is largest, so err <= tol iff allclose(a, b)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    a, b = torch.broadcast_tensors(a, b)
    d = (a - b).abs().flatten()
    lim = (atol + rtol * b.abs()).flatten()
    i = (d / lim).argmax()
    return d[i].item(), lim[i].item()


def bound_err(a, b, bound):
    """(error, tolerance) of |a - b| <= bound element-wise (a bound computed per element from an error model): |a - b|
    and the bound at the element where their ratio is largest, so err <= tol iff every element is within its bound."""
    a, b, bound = torch.broadcast_tensors(torch.as_tensor(a), torch.as_tensor(b), torch.as_tensor(bound))
    d, lim = (a - b).abs().flatten(), bound.flatten()
    i = (d / lim).argmax()
    return d[i].item(), lim[i].item()


def gemm_order_bound(x, w):
    """Bound on |a - b| for two fp32 GEMMs x (..., K) @ w (N, K)^T of the same bf16 operands summed in different
    orders (one GEMM over [w; w'] against two, cuBLAS against MKL): each sum is within K u32 sum_k |x_k w_k| of the
    exact one (every bf16 x bf16 product is exact in fp32), so their difference within twice that."""
    from dsv4_lab.layers import linear_f32
    return 2 * x.shape[-1] * U32 * linear_f32(x.abs(), w.abs())


# ------------------------------------------------------------------------------------------------ per-parameter gradients
def compiled_bf16_grad_bound(eager_bf16_err: float) -> float:
    """The bound on a compiled bf16-autocast gradient's relative error (against eager fp32) where eager bf16's own
    error is below 2e-2, a gradient that bf16 rounding does not dominate: 5x that + 0.1 (<= 0.2, below a
    whole-factor error; Inductor rounds other intermediates to bf16 than eager does: on the CPU compiled reached
    6.8x eager's own error, 0.121 against 0.018, on an mHC base). inf (not checked) where rounding dominates.
    Shared by tests/test_kernels_gpu.py and benchmarks/bench_compile_parity.py."""
    return 5 * eager_bf16_err + 0.1 if eager_bf16_err < 2e-2 else float("inf")


def grad_mismatches(got: dict, ref: dict, rtol: float) -> dict:
    """Every parameter's gradient of two runs ({name: gradient}), by name: {name: (||g - g_ref||, scale)} for those
    with ||g - g_ref|| > rtol * scale, scale = max(||g_ref||, 1e-3 ||G_ref|| / sqrt(#parameters)) (2-norms; G the
    whole gradient). The floor covers gradients that are small by cancellation or zero up to rounding (the gate of
    a top-1 router: its weight w / w is the constant route_scale). A lost gradient (zero) has error = its own norm
    and fails; the two runs must give gradients to the same parameters."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in ref.values())).item()
    floor = 1e-3 * total / len(ref) ** 0.5
    out = {}
    for n, g in ref.items():
        err, scale = (got[n].double() - g.double()).norm().item(), max(g.double().norm().item(), floor)
        if err > rtol * scale:
            out[n] = (err, scale)
    return out
