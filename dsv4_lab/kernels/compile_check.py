"""Lower every kernel the CPU interpreter runs for an sm_90 GPU as well (Triton's front end, to TTIR), on CPU
(docs/kernels.md §7). On when TRITON_INTERPRET=1 and DSV4_GPU_COMPILE_CHECK=1 (the test suite sets it), or by
install().

Why: TRITON_INTERPRET=1 executes a kernel's body as Python, so code the GPU compiler rejects can pass there: a name
bound on one branch of an `if` only and read after it, a loop-carried variable whose type changes in the loop, a
constexpr used as a tensor. Such a kernel passes every interpreter test and fails on its first GPU launch.

install() wraps the interpreter's launch: before a kernel runs, its arguments are specialized exactly as Triton's JIT
would on a GPU (argument types, ints equal to 1 as constants, 16-byte alignment), and the kernel is lowered to TTIR
for sm_90 (no GPU or driver needed). A kernel that does not lower raises KernelDoesNotCompile naming it. Each
distinct specialization is compiled once per process. The launch then runs in the interpreter as before.

The interpreter's own choices still differ from a GPU run's (one autotune config, fp32 tl.dot operands, tiny
blocks: dsv4_lab/kernels/_common.py), so this catches the front end's errors, not every GPU-only failure.
"""
from __future__ import annotations

import contextlib
import sys

TARGET_ARCH = 90


class KernelDoesNotCompile(AssertionError):
    pass


_state: dict = {}


def _setup():
    if not _state:
        from triton._C.libtriton import ir
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        target = GPUTarget("cuda", TARGET_ARCH, 32)
        _state.update(ir=ir, target=target, backend=make_backend(target), jit={}, binders={}, done=set())
    return _state


def _jit(f):
    """The compiled-mode twin (JITFunction) of an InterpretedFunction, one per function."""
    from triton.runtime.jit import JITFunction
    s = _setup()
    if f.fn not in s["jit"]:
        s["jit"][f.fn] = JITFunction(f.fn, **f.kwargs)
    return s["jit"][f.fn]


@contextlib.contextmanager
def _compiled_helpers(kernel_module: str, prefixes: tuple[str, ...] = ("dsv4_lab.", "triton.language")):
    """Module attributes that are interpreted @triton.jit functions swapped for their JITFunction twins while a
    kernel is lowered: the code generator resolves a helper call through the module globals (the kernel's module,
    dsv4_lab's, and triton.language's own @jit library: tl.sum, tl.max, tl.cdiv, ...) and needs a JITFunction."""
    from triton.runtime.interpreter import InterpretedFunction
    swapped = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name.startswith(prefixes) or name == kernel_module):
            continue
        for attr, v in list(vars(mod).items()):
            if isinstance(v, InterpretedFunction):
                swapped.append((mod, attr, v))
                setattr(mod, attr, _jit(v))
    try:
        yield
    finally:
        for mod, attr, v in swapped:
            setattr(mod, attr, v)


_MISSING = object()


def _patched_objects():
    import triton.language as tl
    return (tl, tl.core, tl.math, tl.core.tensor, tl.core.tensor_descriptor_base)


@contextlib.contextmanager
def _pristine_language():
    """triton.language as imported, while a kernel is lowered. The interpreter patches tl's builtins and tensor
    operators for each launch and restores them after it, but a nested helper call patches them again without
    restoring (its patches outlive the launch), and the code generator would run those interpreter versions."""
    changed = []
    for obj, snap in zip(_patched_objects(), _state["pristine"]):
        now = dict(vars(obj))
        for name in set(now) | set(snap):
            if now.get(name, _MISSING) is not snap.get(name, _MISSING):
                changed.append((obj, name, now.get(name, _MISSING)))
                if name in snap:
                    setattr(obj, name, snap[name])
                else:
                    delattr(obj, name)
    try:
        yield
    finally:
        for obj, name, v in changed:
            if v is not _MISSING:
                setattr(obj, name, v)
            elif hasattr(obj, name):
                delattr(obj, name)



def check(f, args, kwargs) -> bool:
    """Lower interpreted kernel f, launched with (args, kwargs), to TTIR for sm_90. True when this specialization was
    new (and compiled), False when it was compiled before. Raises KernelDoesNotCompile."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature
    s = _setup()
    jf = _jit(f)
    if f.fn not in s["binders"]:
        s["binders"][f.fn] = create_function_from_signature(jf.signature, jf.params, s["backend"])
    bound, spec, opts = s["binders"][f.fn](*args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(s["backend"], dict(kwargs), bound, spec, opts)
    key = (f.fn, repr(sorted(signature.items())), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           options.num_warps)
    if key in s["done"]:
        return False
    s["done"].add(key)
    be, ir = s["backend"], s["ir"]
    ctx = ir.context()
    ir.load_dialects(ctx)
    be.load_dialects(ctx)
    try:
        with _pristine_language(), _compiled_helpers(f.fn.__module__):   # the JITFunction twins see JIT helpers
            ASTSource(jf, signature, constexprs, attrs).make_ir(
                s["target"], options, be.get_codegen_implementation(options), be.get_module_map(), ctx)
    except Exception as e:                                                       # noqa: BLE001
        msg = str(e).strip().splitlines()
        raise KernelDoesNotCompile(
            f"{f.fn.__module__}.{f.fn.__name__} runs in the interpreter but does not compile for "
            f"sm_{TARGET_ARCH} ({type(e).__name__}): " + " | ".join(m.strip() for m in msg[-6:])) from None
    return True


def compiled() -> list[str]:
    """The kernels compiled so far (module.name), one entry per distinct specialization."""
    return sorted(f"{k[0].__module__}.{k[0].__name__}" for k in _state.get("done", ()))


def install():
    """Check every interpreted launch from now on (call under TRITON_INTERPRET=1, before any kernel runs). An
    autotuned kernel is lowered with each of its GPU configs too (the interpreter runs one config, the one carrying
    the GPU list: _common.configs)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    if getattr(InterpretedFunction.run, "_compile_checked", False):
        return
    _setup()
    _state["pristine"] = [dict(vars(obj)) for obj in _patched_objects()]      # before any launch patches them
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        check(self, args, kwargs)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
    run._compile_checked = True
    InterpretedFunction.run = run
    orig_tuned = Autotuner.run

    def tuned_run(self, *args, **kwargs):
        gpu = getattr(self.configs[0], "gpu_configs", None) if len(self.configs) == 1 else None
        if gpu and isinstance(self.fn, InterpretedFunction):
            kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            for cfg in gpu:
                check(self.fn, args, {**kw, **cfg.all_kwargs()})
        return orig_tuned(self, *args, **kwargs)
    Autotuner.run = tuned_run
