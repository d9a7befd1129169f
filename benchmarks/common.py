"""Shared benchmark plumbing (docs/kernels.md §9.1): environment record, medians via do_bench / CUDA-graph replay,
ceilings measured in the same run, JSON output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def env_info() -> dict:
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, mem_gb=round(p.total_memory / 2**30, 1))
    from dsv4_lab.runlog import git_commit
    info.update(git_commit(ROOT))                  # the code measured: HEAD, dirty, and the code's own git tree
    try:
        info["clocks"] = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=10).stdout.strip()
    except Exception as e:                                            # pragma: no cover
        info["clocks"] = f"n/a ({e})"
    return info


def bench(fn, warmup=25, rep=100) -> dict:
    """Median / p10 / p90 milliseconds with triton.testing.do_bench (L2 flushed between reps)."""
    from triton.testing import do_bench
    q = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.1, 0.9])
    return {"ms": q[0], "p10_ms": q[1], "p90_ms": q[2]}


HOLD_CYCLES = 2_000_000      # bench_graph(hold=True): the sleep before each timed replay (~1 ms at 2 GHz)


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """fn captured in a CUDA graph after three warm-up calls on a side stream, then replayed five times (the first
    replays upload the graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    return g


def replay_anatomy(fn, reps=50) -> dict:
    """What one replay of fn's graph holds, beside bench_graph's time of it: host_us, the median host time of the
    g.replay() call itself (after a synchronize, not waiting for the GPU: the Python call, torch's bookkeeping and
    the graph launch); kernels, [name, GPU us] of every kernel one profiled replay ran (the captured launches, and
    any torch adds around them); host_ops, the names of the host-side ops the profiler saw in that replay."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    g = capture_graph(fn)
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    ts.sort()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    events = list(prof.events())
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    return {"host_us": ts[len(ts) // 2] * 1e6,
            "kernels": [[e.name, e.time_range.elapsed_us()] for e in gpu],
            "host_ops": sorted({e.name for e in events if e.device_type == DeviceType.CPU})}


def bench_graph(fn, reps=50, hold=False) -> dict:
    """CUDA-graph replay median, ms: one graph launch in place of the host's launches of fn's kernels. The time still
    holds the replay's own start: ~15 us for one tiny kernel on an H100 (benchmarks/README.md, run 49), which we read
    as the GPU, idle after recording the start event, waiting for the host to queue the replay. hold=True queues a
    sleep kernel before the start event, so the GPU reaches that event only once the replay is queued behind it (the
    blocking kernel nvbench uses): the time from the GPU's start of the replay to its end. A tiny kernel's replay
    timed so (bench_csa.py graph_floor_gpu_us) tests that reading: it should take about one kernel's time."""
    g = capture_graph(fn)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hold:
            torch.cuda._sleep(HOLD_CYCLES)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return {"ms": ts[len(ts) // 2], "p10_ms": ts[len(ts) // 10], "p90_ms": ts[(9 * len(ts)) // 10]}


def bench_queued(fn, reps=50, cycles=HOLD_CYCLES, tries=4) -> dict:
    """fn's eager launches timed on the GPU alone, ms: before each timed call the L2 is flushed (as do_bench does) and
    a sleep kernel of `cycles` clocks holds the GPU while the host enqueues the call behind it, so the events time
    fn's kernels back to back, without the gaps in which an idle GPU waits for the host's next launch: an eager call
    inside a forward pass whose GPU, not its host, is the bottleneck (bench_graph(hold=True) does the same for one
    graph launch). A call counts as held when the GPU was still in the sleep once the host had queued it (the
    event after the sleep not yet reached: Event.query); if any call of a round was not held, the round is dropped
    and the sleep doubled, up to `tries` rounds. Returns the median / p10 / p90 ms of the held round, its sleep's
    cycles, and held (False: the last round still had calls the host did not queue in time, and its times include
    host gaps)."""
    flush = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")
    for attempt in range(tries):
        if attempt:
            cycles *= 2
        ts, held = [], True
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.zero_()
            torch.cuda._sleep(cycles)
            a.record()
            fn()
            held = held and not a.query()                   # the GPU still sleeps: the whole call is queued
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        if held:
            break
    ts.sort()
    return {"ms": ts[len(ts) // 2], "p10_ms": ts[len(ts) // 10], "p90_ms": ts[(9 * len(ts)) // 10],
            "cycles": cycles, "held": held}


def replays_us(out: dict, name: str, fn, captures: int = 1) -> None:
    """out[name + "_us"]: bench_graph(fn) in microseconds; out[name + "_gpu_us"]: the same with hold=True. captures >
    1: fn captured that many times, each capture its own graph timed both ways (one capture, then the next), and each
    figure the median over the captures' medians; out[name + "_captures_us"] / [name + "_gpu_captures_us"]: every
    capture's, in order (one capture's median of a ~20 us call moved by up to 1.5 us between two captures of the same
    call: benchmarks/README.md T5)."""
    one, gpu = [], []
    for _ in range(max(1, int(captures))):
        one.append(bench_graph(fn)["ms"] * 1e3)
        gpu.append(bench_graph(fn, hold=True)["ms"] * 1e3)
    out[f"{name}_us"], out[f"{name}_gpu_us"] = sorted(one)[len(one) // 2], sorted(gpu)[len(gpu) // 2]
    if len(one) > 1:
        out[f"{name}_captures_us"], out[f"{name}_gpu_captures_us"] = one, gpu


def _host_rounds(run, calls, reps, warmup) -> list:
    """`reps` rounds of `calls` calls of run(mark) back to back after a synchronize, timed on the host without waiting
    for the GPU; run calls mark(name) at the end of each stage. -> per round {stage: host ms per call}."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        run(lambda name: None)
    rounds = []
    for _ in range(reps):
        acc: dict = {}
        sync()
        last = [time.perf_counter()]

        def mark(name):
            now = time.perf_counter()
            acc[name] = acc.get(name, 0.0) + (now - last[0])
            last[0] = now
        for _ in range(calls):
            run(mark)
        rounds.append({name: t / calls * 1e3 for name, t in acc.items()})
        sync()
    return rounds


def host_ms(fn, calls=20, reps=5) -> dict:
    """The host's time to enqueue one call of fn, ms: `calls` calls back to back after a synchronize, timed on the
    host without waiting for the GPU (median over `reps` such rounds; CUDA queues ~1 000 launches before the host
    blocks, more than `calls` calls of a few dozen launches each; a call that synchronizes itself counts the wait).
    Where it exceeds the GPU time of the call's kernels (`bench_graph`), an eager call runs at the host's pace: the
    gap is launch overhead, not kernel time."""
    def run(mark):
        fn()
        mark("call")
    ts = sorted(r["call"] for r in _host_rounds(run, calls, reps, warmup=3))
    return {"ms": ts[len(ts) // 2], "min_ms": ts[0], "max_ms": ts[-1]}


def host_stages_ms(run, calls=5, reps=5) -> dict:
    """The host's time per call in each stage of a call chain, ms: run(mark) makes one call and calls mark(name) at
    the end of each stage; `calls` calls back to back after a synchronize, timed on the host without waiting for the
    GPU (median per stage over `reps` rounds). Few calls per round, so that CUDA's launch queue (~1 000 launches)
    does not fill and block the host inside some stage. A stage that synchronizes (a device-to-host copy, a
    blocking allocation) shows the GPU's backlog as its own host time: the stage where the chain waits."""
    rounds = _host_rounds(run, calls, reps, warmup=2)
    return {name: sorted(r[name] for r in rounds)[len(rounds) // 2] for name in rounds[0]}


def kernel_ms(fn, calls=20) -> dict:
    """GPU time per call of each kernel fn launches, ms, from the torch profiler ({kernel name: ms}, largest first;
    `calls` calls after 3 warm-up calls): which launch of a multi-kernel op takes the time."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    tot = {a.key: a.self_device_time_total / 1e3 / calls for a in prof.key_averages()
           if a.self_device_time_total > 0 and a.self_cpu_time_total == 0}           # the kernels (no host time)
    return dict(sorted(tot.items(), key=lambda kv: -kv[1]))


_CEIL: dict = {}


def ceilings() -> dict:
    """Copy bandwidth (read + write) and bf16 GEMM rate measured now (METHOD.md: use measured ceilings)."""
    if _CEIL:
        return _CEIL
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)          # 1 GiB
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))["ms"]
    _CEIL["copy_tb_s"] = 2 * x.numel() * 2 / (t * 1e-3) / 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ a)["ms"]
    _CEIL["bf16_gemm_tflops"] = 2 * 8192**3 / (t * 1e-3) / 1e12
    x = y = a = None                                                           # free the buffers
    torch.cuda.empty_cache()
    return _CEIL


def write_json(path: str, payload: dict) -> str:
    """payload to path as indented JSON, atomically (a temporary file renamed over it); its folder is made."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return path


def save(name: str, payload: dict, out_dir: str | None = None) -> str:
    payload = {"env": env_info(), "ceilings": ceilings(), **payload}
    path = None
    for d in [RESULTS] + ([out_dir] if out_dir else []):
        path = write_json(os.path.join(d, f"{name}.json"), payload)
    return path


def safe(fn, *a, **k):
    """Run one measurement; an exception becomes {'error': ...} (the JSON keeps the failure)."""
    try:
        return fn(*a, **k)
    except Exception as e:                                            # noqa: BLE001
        torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
