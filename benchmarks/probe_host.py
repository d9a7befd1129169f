"""Where the host time of the 8K CSA prefill chain goes, call by call (bench_csa.py `pipeline_8192.host_stages` put
~0.5 ms of host time per call in each compressor module, against ~0.02 ms of its Python wrapper measured on the CPU).

Each entry is the host's time to enqueue one call (common.host_ms: calls back to back, no wait for the GPU), at the
8K prefill's shapes (d_model 1024, main compressor c 128 / indexer c 64, ratio 4, overlap):

    mm_out_f32 / mm_bf16 / linear     torch.mm(a, b, out_dtype=fp32) (linear_f32's op), plain bf16 torch.mm, F.linear
    linear_f32                        layers.linear_f32 (the compressor's projection)
    project                           Compressor.project (one linear_f32 over [wkv; wgate]: no autograd, on CUDA)
    pool_autotuned / pool_direct      compressor_pool on projected C, Z with RoPE: through the kernel's autotuner
    / pool_triton_run                 (_common.autotune), with its chosen config launched on the JIT function
                                      directly (both lean), and through Triton's own Autotuner.run on every launch
    compressor                        Compressor.forward (project + pool)
    compressor_triton_run             the same with every Triton launch through JITFunction.run (_common.LEAN off)
    triton_launch_1 / _33             an empty Triton kernel of 1 and of 33 arguments (the pool kernel's count),
                                      launched through Triton's JITFunction.run
    triton_lean_33                    the 33-argument kernel declared with _common.jit: a compiled specialization's
                                      launch through LeanLaunch (binding, then the launcher)
    triton_compiled_run_33            the 33-argument kernel's launcher called on its compiled kernel directly: what
                                      a launch costs without Triton's binding and cache lookup in Python
    chain_host / chain_profile        bench_csa.py's 8K prefill chain (both compressors, the rowsel_bf16 top-k, the
                                      sparse attention): its host time per call, and cProfile's top functions by own
                                      time over PROFILE_CALLS calls (own ms per call, calls per call: Python's share
                                      and the torch / Triton calls it waits in)
    chain_host_triton_run             the chain's host time with every Triton launch through JITFunction.run

    python benchmarks/probe_host.py [--out benchmarks/results/host_probe.json]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, host_ms, write_json  # noqa: E402
from dsv4_lab.kernels import _common  # noqa: E402
from dsv4_lab.kernels._common import jit, tl, triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

N, DM, M = 8192, 1024, 4
PROFILE_CALLS = 200


@triton.jit
def _empty1(A):
    pass


def _e33(A0, A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12,
         n13, n14, n15, n16, n17, n18, n19, C0: tl.constexpr, C1: tl.constexpr):
    pass


_empty33 = triton.jit(_e33)                                 # launched through Triton's JITFunction.run
_lean33 = jit(_e33)                                         # the same kernel declared as the package's are


def swapped(obj, name: str, value, fn):
    """fn with obj.name set to value for the call, restored after it."""
    def call():
        saved = getattr(obj, name)
        setattr(obj, name, value)
        try:
            return fn()
        finally:
            setattr(obj, name, saved)
    return call


def triton_run(fn):
    """fn with every launch through Triton's own JITFunction.run (_common.LEAN off for the call)."""
    return swapped(_common, "LEAN", False, fn)


def chain_profile(top=30):
    """bench_csa.py's 8K prefill chain (`prefill_chain`, rowsel_bf16): host ms per call, and cProfile's top
    functions by own time, each {"fn", "own_ms", "cum_ms", "calls"} per chain call."""
    import bench_csa as bc
    run, _ = bc.prefill_chain(N, "rowsel_bf16")
    run()
    torch.cuda.synchronize()
    out = {"chain_host": host_ms(run), "chain_host_triton_run": host_ms(triton_run(run))}
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(PROFILE_CALLS):
        run()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows = []
    for (f, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"fn": f"{os.path.basename(f)}:{line}({name})", "own_ms": 1e3 * tt / PROFILE_CALLS,
                     "cum_ms": 1e3 * ct / PROFILE_CALLS, "calls": nc / PROFILE_CALLS})
    rows.sort(key=lambda r: -r["own_ms"])
    out["chain_profile"] = rows[:top]
    out["chain_profile_total_ms"] = 1e3 * st.total_tt / PROFILE_CALLS
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/host_probe.json")
    a = ap.parse_args(argv)
    import dsv4_lab.kernels.compressor_pool.triton as ct
    from dsv4_lab.attention.compressor import Compressor
    from dsv4_lab.kernels.compressor_pool import compressor_pool
    from dsv4_lab.layers import linear_f32
    from dsv4_lab.rope import RotaryTable
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    u = torch.randn(1, N, DM, device=dev, dtype=torch.bfloat16, generator=g)
    rope = RotaryTable(64, N, 10000.0).to(dev)
    res = {}
    with torch.no_grad():
        for c in (128, 64):
            comp = Compressor(DM, c, M, overlap=True).to(dev, torch.bfloat16)
            w = comp.wkv.weight
            u2 = u.view(N, DM)
            fns = {"mm_out_f32": lambda: torch.mm(u2, w.t(), out_dtype=torch.float32),
                   "mm_bf16": lambda: torch.mm(u2, w.t()),
                   "linear": lambda: F.linear(u2, w),
                   "linear_f32": lambda: linear_f32(u, w),
                   "project": lambda: comp.project(u),
                   "compressor": lambda: comp(u, rope)}
            C, Z = comp.project(u)
            C, Z = C.unflatten(1, (N // M, M)), Z.unflatten(1, (N // M, M))
            pool = lambda: compressor_pool(C, Z, comp.ape, comp.norm.weight, comp.norm.eps, True,  # noqa: E731
                                           impl="triton", cos=rope.cos, sin=rope.sin)
            fns["pool_autotuned"] = pool
            pool()
            at = ct._compressor_pool_kernel
            best = at.best_config

            class Direct:                               # the autotuner's pick, launched on the JIT function
                def __getitem__(self, grid):
                    meta = best.all_kwargs()
                    gg = grid(meta) if callable(grid) else grid
                    return lambda *args, **kw: at.fn[gg](*args, **kw, **meta)

            class TritonRun:                            # every launch through Triton's own Autotuner.run
                def __getitem__(self, grid):
                    return lambda *args, **kw: Autotuner.run(at, *args, grid=grid, warmup=False, **kw)

            # pool() with the module's kernel object swapped for another
            fns["pool_direct"] = swapped(ct, "_compressor_pool_kernel", Direct(), pool)
            fns["pool_triton_run"] = swapped(ct, "_compressor_pool_kernel", TritonRun(), pool)
            fns["compressor_triton_run"] = triton_run(fns["compressor"])
            for name, fn in fns.items():
                fn()
                torch.cuda.synchronize()
                try:
                    res[f"{name}_c{c}"] = host_ms(fn)
                except Exception as e:                                          # noqa: BLE001
                    res[f"{name}_c{c}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        res.update(chain_profile())
        t = torch.empty(16, device=dev)
        res["triton_launch_1"] = host_ms(lambda: _empty1[(1,)](t))
        args33 = (*([t] * 11), *range(3, 23))
        res["triton_launch_33"] = host_ms(lambda: _empty33[(1,)](*args33, C0=1, C1=2))
        _lean33[(1,)](*args33, C0=1, C1=2)
        res["triton_lean_33"] = host_ms(lambda: _lean33[(1,)](*args33, C0=1, C1=2))
        k33 = _empty33[(1,)](*args33, C0=1, C1=2)           # the CompiledKernel that launch ran
        stream = torch.cuda.current_stream().cuda_stream
        bound = (*args33, 1, 2)                             # every parameter in order, the constexprs included

        def compiled_run():                                 # its launcher alone: no binding, no cache lookup
            k33.run(1, 1, 1, stream, k33.function, k33.packed_metadata, None, None, None, *bound)
        try:
            res["triton_compiled_run_33"] = host_ms(compiled_run)
        except Exception as e:                                                  # noqa: BLE001
            res["triton_compiled_run_33"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    write_json(a.out, {"env": env_info(), "host_probe": res})
    for k, v in res.items():
        if k == "chain_profile":
            for r in v:
                print(f"  {r['own_ms']:8.4f} own {r['cum_ms']:8.4f} cum {r['calls']:6.1f}x  {r['fn']}")
        else:
            print(k, v)


if __name__ == "__main__":
    main()
