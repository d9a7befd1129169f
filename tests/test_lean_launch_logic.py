"""LeanLaunch's decisions on the CPU, with a fake JIT function, binder and compiled kernel (the launches themselves
are tested on the GPU: tests/test_lean_launch.py): which launches go through Triton's run, which are remembered,
what the compiled kernel's launcher is handed (docs/kernels.md §10)."""
from __future__ import annotations

import pytest

from dsv4_lab.kernels import _common

if not _common.HAVE_TRITON:
    pytest.skip("needs triton", allow_module_level=True)


class FakeKernel:
    function, packed_metadata = "fn-handle", "packed"

    def __init__(self):
        self.launches = []

    def run(self, *a):
        self.launches.append(a)


class FakeJIT:
    """fn.run compiles (a new FakeKernel per specialization and options) and launches; the binder's
    specialization is ("*fp32", "D" if the pointer is 16-aligned) per pointer and the int's class."""

    def __init__(self):
        self.pre_run_hooks = []
        self.runs = []
        self.compiled = {}
        self.device_caches = {0: (None, None, None, None, self.binder)}

    @staticmethod
    def binder(x_ptr, n, BLOCK, **options):
        spec = [("*fp32", "D" if x_ptr % 16 == 0 else None), ("i32", "D" if n % 16 == 0 else None),
                ("constexpr", BLOCK)]
        return {"x_ptr": x_ptr, "n": n, "BLOCK": BLOCK}, spec, options

    def run(self, *args, grid, warmup, **kwargs):
        bound, spec, options = self.binder(*args, **kwargs)
        k = self.compiled.setdefault((tuple(spec), tuple(options.items())), FakeKernel())
        self.runs.append((args, kwargs, grid))
        return k


@pytest.fixture
def lean(monkeypatch):
    monkeypatch.setattr(_common, "LEAN", True)
    monkeypatch.setattr(_common, "CompiledKernel", FakeKernel)
    monkeypatch.setattr(_common, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(_common.torch.cuda, "current_device", lambda: 0)
    fn = FakeJIT()
    return fn, _common.LeanLaunch(fn)


def call(launch, *args, grid=(4,), **kw):
    return launch(args, {**kw, "grid": grid, "warmup": False})


def test_first_launch_through_triton_then_the_compiled_launcher(lean):
    fn, launch = lean
    k = call(launch, 64, 32, BLOCK=16, num_warps=4)
    assert len(fn.runs) == 1 and k.launches == []              # Triton's run launched it (the fake records no launch)
    k2 = call(launch, 128, 48, BLOCK=16, num_warps=4, grid=lambda meta: (meta["n"] // meta["BLOCK"], 2))
    assert k2 is k and len(fn.runs) == 1                        # the same specialization: no Triton run
    assert k.launches == [(3, 2, 1, 1234, "fn-handle", "packed", None, None, None, 128, 48, 16)]


@pytest.mark.parametrize("args, kw", [((72, 32), {"BLOCK": 16, "num_warps": 4}),    # pointer not 16-aligned
                                      ((64, 33), {"BLOCK": 16, "num_warps": 4}),    # int not a multiple of 16
                                      ((64, 32), {"BLOCK": 32, "num_warps": 4}),    # another constexpr
                                      ((64, 32), {"BLOCK": 16, "num_warps": 8})])   # other launch options
def test_a_new_specialization_or_options_goes_through_triton(lean, args, kw):
    fn, launch = lean
    call(launch, 64, 32, BLOCK=16, num_warps=4)
    k = call(launch, *args, **kw)
    assert len(fn.runs) == 2 and k.launches == []
    call(launch, *args, **kw)
    assert len(fn.runs) == 2 and len(k.launches) == 1
    assert len(launch.kernels) == 2


def test_warmup_hooks_and_other_triton_take_tritons_run(lean, monkeypatch):
    fn, launch = lean
    call(launch, 64, 32, BLOCK=16)
    launch((64, 32), {"BLOCK": 16, "grid": (1,), "warmup": True})
    assert len(fn.runs) == 2
    fn.pre_run_hooks.append(lambda *a, **k: None)
    call(launch, 64, 32, BLOCK=16)
    assert len(fn.runs) == 3
    fn.pre_run_hooks.clear()

    class Hooks:
        calls = [print]
    monkeypatch.setattr(_common.knobs.runtime, "launch_enter_hook", Hooks())
    call(launch, 64, 32, BLOCK=16)
    assert len(fn.runs) == 4
    monkeypatch.undo()
    monkeypatch.setattr(_common, "LEAN", False)
    monkeypatch.setattr(_common.torch.cuda, "current_device", lambda: 0)
    call(launch, 64, 32, BLOCK=16)
    assert len(fn.runs) == 5


def test_hooks_count_as_idle_only_when_empty():
    assert _common._idle(None)
    assert _common._idle(type("H", (), {"calls": []})())
    assert not _common._idle(type("H", (), {"calls": [print]})())
    assert not _common._idle(print)                             # a bare callable (older Triton's form) is a hook


def test_jit_is_tritons_where_lean_is_off(monkeypatch):
    monkeypatch.setattr(_common, "LEAN", False)

    def k(X, N: _common.tl.constexpr):
        pass
    assert type(_common.jit(k)) is type(_common.triton.jit(k))
    assert type(_common.jit(do_not_specialize=["X"])(k)) is type(_common.triton.jit(k))


def test_jit_declares_a_lean_function_whose_launches_go_through_leanlaunch(monkeypatch):
    monkeypatch.setattr(_common, "LEAN", True)
    monkeypatch.setattr(_common, "INTERPRET", False)

    def k(X, N: _common.tl.constexpr):
        pass
    for f in (_common.jit(k), _common.jit(do_not_specialize=["X"])(k)):
        assert isinstance(f, _common.LeanJITFunction) and isinstance(f.lean, _common.LeanLaunch)
        seen = []
        f.lean = lambda args, kwargs: seen.append((args, kwargs))
        f[(3,)](1, N=2)
        assert seen == [((1,), {"N": 2, "grid": (3,), "warmup": False})]
    assert [p.do_not_specialize for p in _common.jit(do_not_specialize=["X"])(k).params] == [True, False]


def test_keyed_autotuner_over_another_wrapper_launches_through_its_run(monkeypatch):
    """An autotuned kernel under triton.heuristics (the HCA prefill's): the chosen key's launches go to the
    wrapper's own run, which adds its heuristic arguments (LeanLaunch binds a JIT function's arguments only)."""
    monkeypatch.setattr(_common, "LEAN", True)
    seen = []

    class Wrapper:                                              # what triton.heuristics returns: .fn, .run, arg_names
        arg_names = ["X", "n", "BN"]
        fn = staticmethod(lambda: None)

        def run(self, *args, **kw):
            seen.append((args, kw))
    cfgs = [_common.triton.Config({"BN": 1}), _common.triton.Config({"BN": 2})]
    at = _common.autotune(cfgs, ["n"])(Wrapper())
    at._bench = lambda *a, config, **k: float(config.kwargs["BN"])
    for _ in range(3):
        at[(1,)](0, 5)
    assert len(seen) == 3 and all(kw["BN"] == 1 for _, kw in seen)
