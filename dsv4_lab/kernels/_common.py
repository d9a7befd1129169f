"""Shared helpers of the Triton kernels (docs/kernels.md §7).

* `INTERPRET` is read once, when this module is imported. Triton decides at `@triton.jit` decoration time whether a
  kernel runs compiled or in the CPU interpreter, so TRITON_INTERPRET=1 must be set before any kernel module is
  imported (the CPU tests run the kernels in a subprocess for that reason: tests/test_kernels_interpret.py).
* Interpreter traps handled by every kernel here: bf16 is cast to fp32 right after loading and `tl.dot` gets fp32
  operands when interpreting (`dot_dtype`), one autotune config when interpreting (`configs`), every store is
  masked, no `make_block_ptr`.
* `autotune`: triton.autotune whose launches skip Triton's per-launch key building once a key's config is chosen,
  and then launch through `LeanLaunch`: a compiled specialization's launcher called without the rest of
  JITFunction.run's per-launch Python (docs/kernels.md §10).
* Programmatic dependent launch (PDL, sm_90+; `pdl_supported`, `use_pdl`, `pdl_modes`, `dep_wait`): a launch's
  programs may start while the launch before it still runs; each waits for that launch's end and writes
  (griddepcontrol.wait) before it reads what that launch wrote or writes anything, then lets the next launch start
  (griddepcontrol.launch_dependents). Every program of such a launch waits, also one with nothing to do, so no
  launch ends before the one before it (docs/kernels.md §3).
* With DSV4_GPU_COMPILE_CHECK=1 as well (the test suite sets it), every interpreted launch is also lowered for an
  sm_90 GPU (compile_check.py): the interpreter runs a kernel body as Python and lets code pass that the GPU
  compiler rejects.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:                                                                # triton is optional (non-Linux installs)
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:                                                   # pragma: no cover
    triton = None
    tl = None
    HAVE_TRITON = False

if HAVE_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def dep_wait():
        """Wait until the launch before this one has ended and its writes are visible, then let the next launch
        start (a no-op in a launch without PDL)."""
        gdc_wait()
        gdc_launch_dependents()


def pdl_supported(device: torch.device) -> bool:
    """Whether launches on `device` may use PDL: a CUDA device of compute capability 9 or above, not under the
    interpreter, not while torch.compile traces (griddepcontrol is inline PTX, which its analysis of a Triton
    kernel's writes cannot read)."""
    return (not INTERPRET and not torch.compiler.is_compiling() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def use_pdl(pdl: bool | None, default: bool, device: torch.device) -> bool:
    """A kernel module's `pdl` argument resolved: pdl (None: the module's default), where pdl_supported."""
    return (default if pdl is None else bool(pdl)) and pdl_supported(device)


def pdl_modes(launches: int, pdl: bool) -> list:
    """The PDL constexpr of each of a chain's `launches` launches in order: 0 without PDL; with it 1 for the first
    (it waits before anything: the launch before it may have written its inputs) and 2 for the rest (they may load
    what no launch of the chain writes, then wait)."""
    return [0] * launches if not pdl else [1] + [2] * (launches - 1)


if INTERPRET and HAVE_TRITON and os.environ.get("DSV4_GPU_COMPILE_CHECK") == "1":
    from .compile_check import install                              # every interpreted launch also lowered for
    install()                                                       # sm_90: what the interpreter lets pass


_SMS: dict = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of CUDA `device` (132 on an H200), read once per device (grid sizes of persistent
    and split kernels)."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_dtype(t: torch.Tensor):
    """Operand dtype of tl.dot: the input's 16-bit type on the GPU (tensor cores), fp32 in the interpreter."""
    if INTERPRET or t.dtype == torch.float32 or t.dtype == torch.float64:
        return tl.float32
    return tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float16


def configs(gpu_configs: list, interp_config):
    """Autotune configs: the list on the GPU, exactly one when interpreting (more fail: '0 active drivers'). The
    interpreter's config carries the GPU list (`gpu_configs`), which compile_check.py lowers as well."""
    if not INTERPRET:
        return gpu_configs
    interp_config.gpu_configs = list(gpu_configs)
    return [interp_config]


if HAVE_TRITON:
    from triton import knobs
    from triton.compiler import CompiledKernel
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)     # Triton's own current-stream getter
    LEAN = triton.__version__.startswith("3.6.") and _raw_stream is not None   # LeanLaunch reads Triton 3.6

    def _idle(hook) -> bool:
        """True when a launch hook has nothing to call (None, or Triton 3.6's empty HookChain)."""
        return hook is None or (hasattr(hook, "calls") and not hook.calls)

    class KeyedAutotuner(Autotuner):
        """Triton's Autotuner, whose launches go straight to the kernel once the config of their key is chosen.

        Triton's own `run` rebuilds its key on every launch from a dict of every argument and the string of every
        tensor's dtype, host time that a short kernel's launch waits for (docs/kernels.md §10). Here the key is the
        key arguments' values and every argument's dtype: at least as fine as Triton's, so each key keeps the config
        Triton chose at its first launch, and a launch runs the same compiled kernel either way (through
        LeanLaunch). Single-config kernels (the interpreter's) and configs with a pre_hook take Triton's `run`."""

        def __init__(self, fn, configs: list, key: list, reset_to_zero: list | None = None):
            super().__init__(fn, fn.arg_names, configs, key, reset_to_zero, None)
            # a chosen key's launches: a _common.jit kernel's LeanLaunch, else (triton.heuristics' wrapper, a plain
            # triton.jit where LEAN is off) the wrapped object's own run
            self.launch = fn.lean if isinstance(fn, LeanJITFunction) else lambda args, kwargs: fn.run(*args, **kwargs)
            self.key_at = [(k, fn.arg_names.index(k)) for k in key]   # (name, position) of each key argument
            self.chosen = {}                                        # key -> (Config, its launch kwargs)

        def run(self, *args, **kwargs):
            if len(self.configs) < 2:
                return super().run(*args, **kwargs)
            key = (tuple(args[i] if i < len(args) else kwargs.get(k) for k, i in self.key_at),
                   tuple(getattr(a, "dtype", None) for a in args),
                   tuple((k, getattr(v, "dtype", None)) for k, v in kwargs.items()))
            hit = self.chosen.get(key)
            if hit is None:                                         # Triton tunes (or finds) this key's config
                ret = super().run(*args, **kwargs)
                if self.best_config.pre_hook is None:
                    self.chosen[key] = (self.best_config, self.best_config.all_kwargs())
                return ret
            self.best_config = hit[0]
            return self.launch(args, {**kwargs, **hit[1]})

    class LeanLaunch:
        """JITFunction.run for a specialization already compiled, without its per-launch Python (docs/kernels.md §10).

        Triton's `run` binds the arguments (`binder`: each argument's specialization, in C), then on every launch
        reads its debug and instrumentation settings, runs the pre-run hooks, builds a string cache key from the
        specialization and the options, checks the kernel's global values, and builds the launch metadata for the
        enter / exit hooks. Here a launch binds the arguments the same way and looks the kernel up by the
        specialization and the launch options themselves: a pair seen before launches its compiled kernel's
        launcher directly, a new one goes through Triton's `run` (which compiles it if needed and launches it) and
        is remembered. The same compiled kernel runs either way: the specialization holds every argument's type,
        alignment and value class and every constexpr, the options (num_warps, num_stages, ...: an autotuned
        kernel's config) the rest of what Triton compiles for. Any launch hook, pre-run hook or warm-up call takes
        Triton's `run`; so does any Triton other than the 3.6 this is written against (LEAN). Triton's debug knobs
        are read when a specialization is first launched."""

        def __init__(self, fn):
            self.fn = fn
            self.kernels = {}                               # (device, specialization, options) -> CompiledKernel

        def __call__(self, args, kwargs):
            rt = knobs.runtime
            if (not LEAN or kwargs.get("warmup") or self.fn.pre_run_hooks
                    or not _idle(rt.launch_enter_hook) or not _idle(rt.launch_exit_hook)):
                return self.fn.run(*args, **kwargs)
            grid = kwargs.pop("grid")
            kwargs.pop("warmup", None)
            device = torch.cuda.current_device()
            bound, spec, options = self.fn.device_caches[device][4](*args, **kwargs)   # Triton's binder
            key = (device, tuple(spec), tuple(options.items()))    # options: num_warps, num_stages, ...
            kernel = self.kernels.get(key)
            if kernel is None:
                kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
                if isinstance(kernel, CompiledKernel):
                    self.kernels[key] = kernel
                return kernel
            g = grid(bound) if callable(grid) else grid
            kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, _raw_stream(device),
                       kernel.function, kernel.packed_metadata, None, None, None, *bound.values())
            return kernel


    class LeanJITFunction(JITFunction):
        """A JITFunction whose `kernel[grid](...)` launches go through LeanLaunch (`jit`)."""

        def __init__(self, fn, **kwargs):
            super().__init__(fn, **kwargs)
            self.lean = LeanLaunch(self)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.lean(args, {**kwargs, "grid": grid, "warmup": False})


def jit(fn=None, **kwargs):
    """@triton.jit (same arguments) whose launches go through LeanLaunch where it applies (compiled, Triton 3.6);
    under the interpreter or another Triton, triton.jit itself. Every kernel of the package is declared with it."""
    if INTERPRET or not HAVE_TRITON or not LEAN:
        return triton.jit(fn, **kwargs) if fn is not None else triton.jit(**kwargs)
    return LeanJITFunction(fn, **kwargs) if fn is not None else (lambda f: LeanJITFunction(f, **kwargs))


def autotune(configs: list, key: list, reset_to_zero: list | None = None):
    """@triton.autotune(configs, key, reset_to_zero) with KeyedAutotuner's launch."""
    return lambda fn: KeyedAutotuner(fn, configs, key, reset_to_zero)


def check_device(*ts: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in ts:
        if t is None:
            continue
        if not (t.is_cuda or INTERPRET):
            raise RuntimeError(f"Triton kernel got a tensor on {t.device}: allowed are CUDA tensors, or CPU tensors with "
                               "TRITON_INTERPRET=1 set before the kernel modules are imported")
