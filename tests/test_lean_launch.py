"""_common.jit / LeanLaunch on a CUDA GPU (skipped without CUDA or under the interpreter): a launch of a compiled
specialization skips JITFunction.run's per-launch Python and must run the kernel Triton's `run` would run, with the
same arguments, on the current stream (docs/kernels.md §10)."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("GPU tests do not run under the Triton interpreter", allow_module_level=True)

from dsv4_lab.kernels import _common  # noqa: E402
from dsv4_lab.kernels._common import autotune, jit, tl, triton  # noqa: E402

if not _common.LEAN:
    pytest.skip("LeanLaunch is off for this Triton / torch (jit is triton.jit)", allow_module_level=True)


@jit
def _axpb(X, Y, n, a, b, BLOCK: tl.constexpr):
    """Y[i] = a * X[i] + b, for i < n."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(Y + i, a * tl.load(X + i, mask=m) + b, mask=m)


@autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 256}, num_warps=4)],
          key=["n"])
@jit
def _axpb_tuned(X, Y, n, a, b, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(Y + i, a * tl.load(X + i, mask=m) + b, mask=m)


class _Count:
    """Counts the launches of `fn` that go through Triton's own JITFunction.run."""

    def __init__(self, monkeypatch, fn):
        self.calls = 0
        run = type(fn).run

        def counted(this, *a, **k):
            if this is fn:
                self.calls += 1
            return run(this, *a, **k)
        monkeypatch.setattr(type(fn), "run", counted)


def _x(n, offset=0):
    g = torch.Generator(device="cuda").manual_seed(n + offset)
    return torch.randn(n + offset, device="cuda", generator=g)[offset:]


def test_a_compiled_specialization_launches_lean_with_the_same_bits(monkeypatch):
    count = _Count(monkeypatch, _axpb)
    x, n = _x(1000), 1000
    y1, y2, y3 = (torch.empty_like(x) for _ in range(3))
    grid = (triton.cdiv(n, 128),)
    _axpb[grid](x, y1, n, 1.5, -0.25, BLOCK=128)               # first: Triton's run (compiles, remembered)
    calls = count.calls
    _axpb[grid](x, y2, n, 1.5, -0.25, BLOCK=128)               # then the lean path
    assert count.calls == calls and calls >= 1
    type(_axpb).run(_axpb, x, y3, n, 1.5, -0.25, BLOCK=128, grid=grid, warmup=False)   # Triton's run itself
    torch.cuda.synchronize()
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    assert torch.allclose(y2, 1.5 * x - 0.25, rtol=0, atol=4e-6)


@pytest.mark.parametrize("n, offset", [(1, 0), (16, 0), (17, 0), (1000, 1), (4096, 3)])
def test_every_specialization_computes_its_own_arguments(n, offset):
    """Integer 1, multiples of 16 and misaligned pointers are specializations of their own; launched in turn, first
    through Triton's run and then lean, each gives its own arguments' values (a kernel compiled for an aligned
    pointer or n % 16 == 0 launched on arguments that break what it assumes would not)."""
    x = _x(n, offset)
    for _ in range(3):
        y = torch.full_like(x, float("nan"))
        _axpb[(triton.cdiv(n, 64),)](x, y, n, 2.0, 1.0, BLOCK=64)
        torch.cuda.synchronize()
        assert torch.allclose(y, 2.0 * x + 1.0, rtol=0, atol=4e-6)


def test_aligned_and_misaligned_inputs_do_not_share_a_kernel():
    kernels = _axpb.lean.kernels
    before = set(kernels)
    for offset in (0, 1):
        x = _x(4096, offset)
        y = torch.empty(4096 + 1, device="cuda")[1:] if offset else torch.empty(4096, device="cuda")
        _axpb[(128,)](x, y, 4096, 3.0, 0.0, BLOCK=32)           # BLOCK 32: no other test's specialization
        _axpb[(128,)](x, y, 4096, 3.0, 0.0, BLOCK=32)
        torch.cuda.synchronize()
        assert torch.allclose(y, 3.0 * x, rtol=0, atol=4e-6)
    new = set(kernels) - before
    x_specs = {k[1][0] for k in new}                            # the specialization of X in each new kernel
    assert len(x_specs) == 2, x_specs                           # aligned ("D") and not


def test_launches_go_to_the_current_stream():
    """A launch on a side stream runs after that stream's earlier work (a sleep, then the fill it reads)."""
    n = 1 << 16
    x, y = torch.zeros(n, device="cuda"), torch.empty(n, device="cuda")
    _axpb[(n // 256,)](x, y, n, 1.0, 0.0, BLOCK=256)            # compiled and remembered on the default stream
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)                           # ~25 ms: the fill lands long after the host moves on
        x.fill_(7.0)
        _axpb[(n // 256,)](x, y, n, 1.0, 0.0, BLOCK=256)
    s.synchronize()
    assert bool((y == 7.0).all())


def test_a_launch_hook_takes_tritons_run(monkeypatch):
    from triton import knobs
    count = _Count(monkeypatch, _axpb)
    seen = []

    def hook(meta):
        seen.append(meta)
    x = _x(512)
    y = torch.empty_like(x)
    _axpb[(8,)](x, y, 512, 1.0, 0.0, BLOCK=64)                   # compiled and remembered
    calls = count.calls
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _axpb[(8,)](x, y, 512, 1.0, 0.0, BLOCK=64)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    torch.cuda.synchronize()
    assert count.calls == calls + 1 and len(seen) == 1


def test_keyed_autotuner_launches_lean_with_the_chosen_config(monkeypatch):
    count = _Count(monkeypatch, _axpb_tuned.fn)
    x = _x(3000)
    ys = [torch.empty_like(x) for _ in range(3)]
    for y in ys:
        _axpb_tuned[lambda meta: (triton.cdiv(3000, meta["BLOCK"]),)](x, y, 3000, -1.0, 2.0)
    torch.cuda.synchronize()
    tuned = count.calls                                          # the tuning runs (one per config) and the first launch
    _axpb_tuned[lambda meta: (triton.cdiv(3000, meta["BLOCK"]),)](x, ys[0], 3000, -1.0, 2.0)
    torch.cuda.synchronize()
    assert count.calls == tuned                                  # a chosen key: no call of Triton's run
    assert all(torch.equal(y, ys[0]) for y in ys)
    assert torch.allclose(ys[0], -x + 2.0, rtol=0, atol=4e-6)
    (key, (cfg, _)), = _axpb_tuned.chosen.items()
    used = {k[2] for k in _axpb_tuned.fn.lean.kernels}           # the options of the kernels launched lean
    assert any(("num_warps", cfg.num_warps) in opts for opts in used)
