"""Triton kernels vs their naive twins on CPU under TRITON_INTERPRET=1 (docs/kernels.md §7, T11).

Why a subprocess: Triton decides interpreted-vs-compiled when a `@triton.jit` function is *decorated*, i.e. when the
kernel module is first imported. Setting TRITON_INTERPRET here would be too late if any other test module (or
conftest) imported dsv4_lab.kernels.*.triton first in this pytest process. So one subprocess per test-file run
executes every case in tests/kernels_cases.py with TRITON_INTERPRET=1 set in its environment before Python starts,
and writes one JSON record per case; the tests below read those records. Tiny shapes, fp32, one thread
(~70 s in total on one core; the indexer top-k and select cases ~20 s each).

Covered per kernel (fwd and, where differentiable, every input gradient): odd lengths, non-power-of-two head
counts and dims, -1 / out-of-range / repeated indices, fewer visible entries than k, no sink and a -inf sink,
window 0, decode with a position offset; the naive twins are also checked against
reference_attention.sink_attention (fp64);
the indexer top-k (method="auto" and every method) as the multiset of the picks' exact scores against torch.topk of
fp64 scores (dyadic inputs, ties at the k-th value, k above the visible count), the select methods exactly as the
naive twin; the split-row radix select slot by slot in its fixed order (ties spanning several programs, repeated
with the programs of every launch run in reverse order); fake_quant bit-for-bit against
dsv4_lab.quant (FP8 1x128, 1x64, 2-D tiles, MXFP4; fp32 and bf16); the fused compressor pool element by element
within its error model against the fp64 twin, and the Compressor module's kernel path (forward and chunked step())
against its torch path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if sys.platform != "linux":                                      # triton is a Linux-only dependency (pyproject)
    pytest.skip(f"triton is not installed on {sys.platform} (a Linux-only dependency)", allow_module_level=True)
HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["sparse_attn", "hca_attn", "indexer_topk", "indexer_methods", "indexer_select", "indexer_mxfp4", "fake_quant",
         "mhc", "sparse_decode", "hca_decode", "sparse_kl", "compressor_pool", "compressor_pool_bwd", "swiglu", "rope",
         "rmsnorm"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("kint") / "res.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "kernels_cases.py"), "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"interpreter worker failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("op", CASES)
def test_kernel_matches_naive_interpreted(results, op):
    rec = results[f"{op}[float32]"]
    assert rec["ok"], rec.get("error")


def test_every_interpreted_case_is_asserted(results):
    """kernels_cases.py runs every case of its CASES table: each must have its assert above (a case missing from
    CASES here would run and fail unseen)."""
    ran = {key.split("[")[0] for key in results}
    assert ran == set(CASES), f"cases run but not asserted: {sorted(ran - set(CASES))}; listed, not run: " \
        f"{sorted(set(CASES) - ran)}"


def test_dispatch_rules():
    from dsv4_lab.config import ModelConfig
    from dsv4_lab.kernels import resolve_impl, use_triton
    x = torch.zeros(2)
    assert not use_triton(ModelConfig(kernels="torch"), x)
    assert not use_triton(ModelConfig(kernels="auto"), x)          # CPU tensor, no interpreter in this process
    assert resolve_impl("triton", x) == "triton"
    with pytest.raises(ValueError):
        resolve_impl("cuda", x)


def test_torch_path_of_dispatchers_runs_on_cpu():
    from dsv4_lab.kernels.compressor_pool import compressor_pool
    from dsv4_lab.kernels.fake_quant import fake_quant
    from dsv4_lab.kernels.hca_attn import hca_attn
    from dsv4_lab.kernels.indexer_topk import indexer_topk
    from dsv4_lab.kernels.mhc import mhc_post, mhc_pre
    from dsv4_lab.kernels.sparse_attn import sparse_attn
    from dsv4_lab.kernels.sparse_kl import sparse_kl
    q, kv, comp = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 16), torch.randn(1, 2, 16)
    idx = torch.tensor([[[0, -1]] * 8])
    assert sparse_attn(q, kv, comp, idx, None, 0.25, 4, impl="torch").shape == q.shape
    assert hca_attn(q, kv, comp, torch.zeros(2), 0.25, 4, 4, impl="torch").shape == q.shape
    qI, kI, w = torch.randn(1, 8, 2, 4), torch.randn(1, 2, 4, requires_grad=True), torch.ones(1, 8, 2)
    kl = sparse_kl(q, comp, idx, torch.zeros(1, 8, 2), 0.25, qI, kI, w, impl="torch")
    kl.backward()
    assert kl.dim() == 0 and kI.grad.shape == kI.shape
    assert indexer_topk(torch.randn(1, 8, 2, 4), torch.randn(1, 2, 4), torch.ones(1, 8, 2), 3, 4,
                        impl="torch").shape == (1, 8, 3)
    x = torch.randn(3, 64, requires_grad=True)
    y = fake_quant(x, "fp4", 32, impl="torch")
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))                 # straight-through gradient
    xs = torch.randn(1, 4, 4, 8)
    u, coef = mhc_pre(xs, torch.randn(24, 32) * 0.1, torch.ones(3), torch.zeros(24), impl="torch")
    assert mhc_post(u, xs, coef, impl="torch").shape == xs.shape
    assert compressor_pool(torch.randn(1, 3, 4, 32), torch.randn(1, 3, 4, 32), torch.zeros(4, 32), torch.ones(16),
                           1e-6, True, impl="torch").shape == (1, 3, 16)
