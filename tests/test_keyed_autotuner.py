"""_common.autotune (KeyedAutotuner, docs/kernels.md §10): the same launches as Triton's own autotuner, with
Triton's per-launch key building only at each key's first launch. CPU: the kernel is a stub that records its
launches, and the autotuner's timings are made up (deterministic, different configs winning for different keys)."""
import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner  # noqa: E402

from dsv4_lab.kernels import _common  # noqa: E402
from dsv4_lab.kernels._common import autotune  # noqa: E402


@pytest.fixture(autouse=True)
def stub_launches(monkeypatch):
    """A chosen key's launches reach the stub's own run (LeanLaunch off, as on a machine without CUDA; LeanLaunch
    itself: tests/test_lean_launch_logic.py)."""
    monkeypatch.setattr(_common, "LEAN", False)

CONFIGS = [triton.Config({"BN": bn}, num_warps=w) for bn, w in ((1, 2), (2, 4), (4, 4), (8, 8))]
KEY = ["n", "C_"]


class StubKernel:
    """What the autotuner wraps: records each launch's arguments (tensors by dtype) and keyword arguments."""
    arg_names = ["X", "Y", "n", "C_", "BN"]

    @staticmethod
    def fn():                               # the autotuner walks .fn down to a plain function (its name)
        pass

    def __init__(self):
        self.launches = []

    def run(self, *args, **kw):
        self.launches.append((tuple(a.dtype if torch.is_tensor(a) else a for a in args), kw))


def fake_bench(*args, config, **kw):
    """Made-up timings: which config wins depends on n, C_ and X's dtype."""
    return float((config.kwargs["BN"] * 7 + kw["C_"] * 3 + args[2] + 5 * (args[0].dtype == torch.float32)) % 5
                 + 0.1 * config.kwargs["BN"])


def calls():
    x32, x16, y = torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4)
    grid = (3,)
    seq = [(x32, 8, 64), (x16, 8, 64), (x32, 8, 64), (x32, 9, 64), (x16, 8, 64), (x32, 8, 128), (x16, 9, 128),
           (x32, 9, 64), (x16, 8, 64), (x32, 8, 128)]
    return [(grid, (x, y, n), {"C_": c}) for x, n, c in seq]


def launches(at, stub):
    at._bench = fake_bench
    for grid, args, kw in calls():
        at[grid](*args, **kw)
    return stub.launches


def count_triton_runs(monkeypatch) -> list:
    """A list that gets one entry per call of Triton's own Autotuner.run from now on."""
    runs, orig = [], Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: (runs.append(1), orig(self, *a, **k))[1])
    return runs


def test_keyed_autotuner_launches_as_triton_does(monkeypatch):
    ref_stub, stub = StubKernel(), StubKernel()
    ref = launches(Autotuner(ref_stub, StubKernel.arg_names, CONFIGS, KEY, None, None), ref_stub)
    assert len({kw["BN"] for _, kw in ref}) > 1                  # the made-up timings pick different configs

    triton_runs = count_triton_runs(monkeypatch)
    got = launches(autotune(CONFIGS, KEY)(stub), stub)
    assert got == ref                                            # same arguments, same config, launch by launch
    keys = {(args[2], kw["C_"], args[0].dtype) for _, args, kw in calls()}
    assert len(triton_runs) == len(keys) < len(calls())          # Triton's run only at each key's first launch


def test_keyed_autotuner_single_config_takes_tritons_run(monkeypatch):
    stub = StubKernel()
    at = autotune(CONFIGS[:1], KEY)(stub)
    triton_runs = count_triton_runs(monkeypatch)
    for grid, args, kw in calls():
        at[grid](*args, **kw)
    assert len(triton_runs) == len(calls()) and all(kw["BN"] == 1 for _, kw in stub.launches)
