"""Triton kernels vs their naive twins on CPU under TRITON_INTERPRET=1 (docs/kernels.md §7, T11).

Why subprocesses: Triton decides interpreted-vs-compiled when a `@triton.jit` function is *decorated*, i.e. when the
kernel module is first imported. Setting TRITON_INTERPRET here would be too late if any other test module (or
conftest) imported dsv4_lab.kernels.*.triton first in this pytest process. So each case of tests/kernels_cases.py
runs in a subprocess of its own with TRITON_INTERPRET=1 set in its environment before Python starts, as many at
once as there are cores (at most 4), the longest first, each within CASE_TIMEOUT; each writes its JSON record and
the tests below read them. Tiny shapes, fp32, one thread per case; every interpreted launch is also compiled for
sm_90 (kernels.compile_check), which is most of the time: ~10 minutes of one core in all, the three indexer top-k
cases 2-3 minutes each.

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
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

if sys.platform != "linux":                                      # triton is a Linux-only dependency (pyproject)
    pytest.skip(f"triton is not installed on {sys.platform} (a Linux-only dependency)", allow_module_level=True)
HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["sparse_attn", "hca_attn", "indexer_topk", "indexer_methods", "indexer_select", "indexer_mxfp4", "fake_quant",
         "mhc", "sparse_decode", "hca_decode", "sparse_kl", "compressor_pool", "compressor_pool_bwd", "swiglu", "rope",
         "rmsnorm"]


SLOW_FIRST = ["indexer_select", "indexer_topk", "indexer_methods"]     # started first: the longest cases
CASE_TIMEOUT = 900                                                      # s, one case in its own process
WORKERS = max(1, min(4, os.cpu_count() or 1))


def _run_case(op, tmp):
    """One case of kernels_cases.py in a subprocess under the interpreter -> its records (a failed or timed-out
    worker gives a record that says so)."""
    out = tmp / f"{op}.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "kernels_cases.py"), "--json", str(out), "--only", op],
                           env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {f"{op}[float32]": {"ok": False, "error": f"interpreter worker timed out after {CASE_TIMEOUT} s"}}
    if p.returncode != 0 or not out.exists():
        return {f"{op}[float32]": {"ok": False, "error": f"interpreter worker failed (rc {p.returncode}):\n"
                                                         f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"}}
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def listed():
    """The cases kernels_cases.py defines (its CASES table)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "kernels_cases.py"), "--list"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.split()


@pytest.fixture(scope="module")
def results(tmp_path_factory, listed):
    tmp = tmp_path_factory.mktemp("kint")
    order = [op for op in SLOW_FIRST if op in listed] + [op for op in listed if op not in SLOW_FIRST]
    res = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        for rec in pool.map(lambda op: _run_case(op, tmp), order):
            res.update(rec)
    return res


@pytest.mark.parametrize("op", CASES)
def test_kernel_matches_naive_interpreted(results, op):
    rec = results[f"{op}[float32]"]
    assert rec["ok"], rec.get("error")


def test_every_interpreted_case_is_asserted(results, listed):
    """kernels_cases.py's CASES table and the cases run are CASES here: each case it defines has its assert above (a
    case missing from CASES here would run and fail unseen), and each ran."""
    ran = {key.split("[")[0] for key in results}
    assert set(listed) == set(CASES), f"cases defined but not asserted: {sorted(set(listed) - set(CASES))}; " \
        f"asserted, not defined: {sorted(set(CASES) - set(listed))}"
    assert ran == set(CASES), f"cases not run: {sorted(set(CASES) - ran)}; run, not listed: {sorted(ran - set(CASES))}"


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
