"""End-to-end training throughput: DeepSeek-V4 (`small`) against the dense baseline (`small-dense`) on one GPU.

Two arms, each at its best settings, at context 4K / 16K / 64K with 65,536 tokens per optimizer step
(batch = 65536 / context):
  v4     preset small: swa, swa, csa, hca, ... (Triton kernels), mHC, MoE (grouped dispatch), MTP 1, indexer KL
  dense  preset small-dense: dense causal MQA through fused SDPA, plain residual, dense SwiGLU, no MTP
  v4-bf16-index  v4 with index_score_dtype=bf16 (V4's bf16 index scores before the top-k): a setting of the v4 arm,
         whose best of either is the v4 number (e2e_best_settings names the setting)
"Best settings": every arm is measured eager, compiled (dsv4_lab/compilation.py, the `compile` field of training)
and graphed (eager model, forward + backward replayed from a CUDA graph: the `cuda_graph` field, whole batch in one
forward); the fastest is its number, and `e2e_best_settings` says which. One step = forward + backward + AdamW
step under bf16 autocast, as dsv4_lab.train does on CUDA; random token ids. Reported per measurement: median step
time over `steps` timed steps after `warmup` steps (the first compiled step includes compilation), tokens/s, peak
memory of the timed steps. An arm that runs out of memory is retried with half the sequences per forward/backward
(gradient accumulation: same tokens per step) down to one sequence.

Robust and resumable: every (arm, context, mode) runs in its own subprocess with a wall-clock cap; each result is
merged into benchmarks/results/e2e.json as it arrives, and the summary keys into benchmarks/results/summary.json:
    e2e_tokens_per_s   {"v4": {"4096": .., "16384": .., "65536": ..}, "dense": {...}}   best mode per arm
    e2e_peak_mem_gb    same shape (of the best mode)
    e2e_v4_over_dense  {"4096": r, ...}
    e2e_best_settings  {"v4": {"4096": "blocks" | "eager" | "blocks, index_score_dtype=bf16" ...}, ...}
    e2e_v4_breakdown   GPU time of one V4 step by component (attention, KL, mHC, MoE, MTP, optimizer, other)
A second call skips what is already measured (--fresh starts over), so a time-capped device call returns partial
results instead of nothing.

    python benchmarks/bench_e2e.py [--ctx 4096 16384 65536] [--arms v4 dense v4-bf16-index]
                                   [--modes compiled blocks eager graph] [--arm-modes v4=blocks dense=compiled]
                                   [--steps 6] [--warmup 3] [--cap 300] [--fresh] [--budget 560]
    python benchmarks/bench_e2e.py --breakdown-only [--profile-ctx 16384]
    python benchmarks/bench_e2e.py --breakdown CTX [--breakdown-mode eager|blocks]     one step's profile, printed
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")
TOKENS_PER_STEP = 65536
ARMS = {"v4": "small", "dense": "small-dense", "v4-bf16-index": "small index_score_dtype=bf16"}
MAIN_ARMS = ("v4", "dense")                      # the compared arms; the others are settings of one of them
MODES = ("compiled", "blocks", "eager", "graph")  # compile=true (whole model), compile=blocks (regional), eager,
                                                 # graph (eager, forward + backward replayed: cuda_graph=true)


# --------------------------------------------------------------------------------------------------------------
# one measurement (child process)
# --------------------------------------------------------------------------------------------------------------

def _config(spec: str, **kw):
    """ModelConfig of an arm's spec: a preset name, then key=value overrides ("small index_score_dtype=bf16")."""
    from dsv4_lab.config import parse_overrides
    name, *over = spec.split()
    return parse_overrides([f"preset={name}", *over, *(f"{k}={v}" for k, v in kw.items())])[0]


def _model(preset: str, ctx: int, compiled: bool, device: str = "cuda"):
    import torch

    from dsv4_lab import DSV4LM
    from dsv4_lab.compilation import compile_model
    from dsv4_lab.config import TrainConfig
    from dsv4_lab.train import build_optimizer
    torch.manual_seed(0)
    cfg = _config(preset, max_seq_len=max(ctx, 4096))
    model = DSV4LM(cfg).to(device).train()
    opt = build_optimizer(model, TrainConfig())
    fwd = model
    if compiled == "graph":                          # forward + backward from one CUDA graph (dsv4_lab/cuda_graph.py)
        from dsv4_lab.cuda_graph import GraphedStep
        fwd = GraphedStep(model, lambda: torch.autocast("cuda", dtype=torch.bfloat16), warmup=2)
    elif compiled:                                   # True | "blocks"
        fwd = compile_model(model, regional=compiled == "blocks")
    return cfg, model, fwd, opt


def _step(fwd, opt, x, y, mb):
    import torch
    from dsv4_lab.cuda_graph import GraphedStep
    B = x.shape[0]
    if isinstance(fwd, GraphedStep):                 # one graph over the whole batch (no accumulation), grads kept
        if mb != B:
            raise torch.cuda.OutOfMemoryError("graph mode runs the whole batch in one forward")
        out = fwd(x, y)
        opt.step()
        return out
    for j in range(0, B, mb):                        # one optimizer step over all B sequences (fp32 on CPU, as train)
        with torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else contextlib.nullcontext():
            out = fwd(x[j:j + mb], y[j:j + mb])
        (out.loss * (x[j:j + mb].shape[0] / B)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


def measure(preset: str, ctx: int, compiled: bool, warmup: int, steps: int, guard_s: float, device: str = "cuda",
            tokens_per_step: int = TOKENS_PER_STEP) -> dict:
    import torch
    B = max(1, tokens_per_step // ctx)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mb, tried = B, []
    while True:
        try:
            cfg, model, fwd, opt = _model(preset, ctx, compiled, device)
            ids = torch.randint(0, cfg.vocab_size, (B, ctx + 1), device=device)
            x, y = ids[:, :-1], ids[:, 1:]
            times, losses, first_s = [], [], None
            for i in range(warmup + steps):
                if i == warmup and cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                out = _step(fwd, opt, x, y, mb)
                sync()
                dt = time.perf_counter() - t0
                first_s = dt if first_s is None else first_s
                losses.append(out.loss.item())
                if i >= warmup:
                    times.append(dt)
                if i > 0 and dt > guard_s:
                    return {"error": f"time guard: step {i} took {dt:.1f} s > {guard_s} s", "batch": B,
                            "micro_batch": mb}
            break
        except torch.cuda.OutOfMemoryError as e:
            model = fwd = opt = None
            if cuda:
                torch.cuda.empty_cache()
            tried.append(mb)
            if mb == 1:
                return {"error": f"OutOfMemoryError at micro-batch 1: {str(e)[:200]}", "oom_at_micro_batch": tried}
            mb //= 2
    times.sort()
    med = times[len(times) // 2]
    r = {"preset": preset, "mode": compiled if compiled in ("blocks", "graph") else "compiled" if compiled else "eager",
         "ctx": ctx, "batch": B, "micro_batch": mb,
         "tokens_per_step": B * ctx, "step_ms": med * 1e3, "step_ms_all": [t * 1e3 for t in times],
         "tokens_per_s": B * ctx / med, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
         "first_step_s": first_s, "loss_first": losses[0], "loss_last": losses[-1],
         "finite": all(v == v for v in losses), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
         "layer_types": list(cfg.layer_types)}
    if tried:
        r["oom_at_micro_batch"] = tried
    return r


# --------------------------------------------------------------------------------------------------------------
# per-component breakdown of one V4 step (child process)
# --------------------------------------------------------------------------------------------------------------

COMPONENTS = ("mtp", "kl", "mhc", "moe", "attention", "optimizer")      # innermost-first priority, then "other"
TOP_OPS = 40                                                        # ops listed by self time in a breakdown

# Kernel families of a compiled (blocks) step, where the profiler's ranges are gone: each op is named by what it
# launches. Our Triton kernels by the kernels/ folder that defines them (a launch inside a compiled graph carries a
# numeric suffix, "_sparse_bwd_6"), then aten ops and library kernels by name; Inductor's fused kernels ("triton_...")
# are the compiled glue. The MoE router's and the indexer's top-k are one aten op: "topk" holds both.
KERNEL_DIR_FAMILY = {"sparse_attn": "attention", "hca_attn": "attention", "indexer_topk": "attention",
                     "compressor_pool": "attention", "rope": "attention", "sparse_kl": "kl", "mhc": "mhc",
                     "swiglu": "ffn", "rmsnorm": "norm", "fake_quant": "quant"}
NAME_FAMILY = (("grouped_mm", "moe"), ("GroupProblem", "moe"), ("topk", "topk"), ("foreach", "optimizer"),
               ("Optimizer.", "optimizer"), ("aten::mm", "gemm"), ("aten::bmm", "gemm"), ("aten::addmm", "gemm"),
               ("aten::linear", "gemm"), ("mm_bf16", "gemm"), ("triton_", "inductor glue"), ("aten::", "eager glue"))


def kernel_table(root: str | None = None) -> dict:
    """{name: family} of the Triton kernels (functions under @triton.jit or _common's @jit) and autograd Functions
    (eager profiles name an op by its Function: "SparseAttnFnBackward") defined under dsv4_lab/kernels/<folder>/."""
    root = root or os.path.join(os.path.dirname(HERE), "dsv4_lab", "kernels")
    table = {}
    for folder, fam in KERNEL_DIR_FAMILY.items():
        for f in sorted(glob.glob(os.path.join(root, folder, "*.py"))):
            src = open(f).read()
            for name in re.findall(r"@(?:triton\.)?jit\b[^\n]*\n(?:@[^\n]*\n)*def (\w+)", src):
                table[name] = fam
            for name in re.findall(r"^class (\w+)\(torch\.autograd\.Function\)", src, re.M):
                table[name] = table[name + "Backward"] = fam
    return table


def kernel_family(name: str, table: dict) -> str:
    """The family of one profiled op name (kernel_table for our kernels; NAME_FAMILY by substring; else other)."""
    base = re.sub(r"_\d+$", "", name)
    if name in table or base in table:
        return table.get(name, table.get(base))
    return next((fam for key, fam in NAME_FAMILY if key in name), "other")


def breakdown(ctx: int, mode: str = "eager", device: str = "cuda") -> dict:
    """Device time of one V4 step by component from the torch profiler. Forward ops are labelled by the
    record_function range they run in (module forward hooks; MTP wins over what it contains, then KL, mHC, MoE,
    attention); a backward node gets the label of the forward op with the same autograd sequence number; the
    optimizer step is one range; the rest (embedding, head, loss, norms, ...) is "other".
    mode "blocks": the model compiled as training compiles it on CUDA (compile=blocks). Dynamo drops profiler ranges
    inside compiled regions, so the components blur there (most time lands in "other"); the total, the top ops
    (Inductor's fused kernels by name, the hand-written kernels by theirs), `ms_by_kernel_family` (every op's time
    by what it launches: kernel_family) and `wall_ms` (the step's wall-clock time: wall_ms - total_ms = the time the
    GPU waited for the host) are what this mode is for. CUDA only: on the CPU the
    profiled compiled step of the tiny model aborts the process (glibc "double free", torch 2.x; the same compiled
    training runs without the profiler)."""
    if mode == "blocks" and device != "cuda":
        raise ValueError(f"--breakdown-mode blocks with --breakdown-device {device!r}: allowed only with cuda")
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from dsv4_lab import DSV4LM
    from dsv4_lab.attention import attention as attn_mod
    from dsv4_lab.attention.attention import Attention
    from dsv4_lab.config import TrainConfig
    from dsv4_lab.moe import MoE
    from dsv4_lab.train import build_optimizer
    torch.manual_seed(0)
    preset = "small" if device == "cuda" else "tiny"
    cfg = _config(preset, max_seq_len=max(ctx, 4096) if device == "cuda" else 512)
    model = DSV4LM(cfg).to(device).train()
    opt = build_optimizer(model, TrainConfig())
    B = max(1, (TOKENS_PER_STEP if device == "cuda" else 2 * ctx) // ctx)
    ids = torch.randint(0, cfg.vocab_size, (B, ctx + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def label(fn, name):
        def wrapped(*a, **k):
            with record_function(f"e2e::{name}"):
                return fn(*a, **k)
        return wrapped

    for m in model.modules():                        # label every component's forward
        if isinstance(m, Attention):
            m.forward = label(m.forward, "attention")
        elif isinstance(m, MoE):
            m.forward = label(m.forward, "moe")
        if hasattr(m, "pre") and hasattr(m, "post") and type(m).__name__ != "Block":
            m.pre, m.post = label(m.pre, "mhc"), label(m.post, "mhc")
    if model.hc_head is not None:
        model.hc_head.forward = label(model.hc_head.forward, "mhc")
    if model.mtp is not None:
        model.mtp.forward = label(model.mtp.forward, "mtp")
    attn_mod.sparse_kl = label(attn_mod.sparse_kl, "kl")              # the indexer KL (Attention.forward)
    fwd = model
    if mode == "blocks":
        from dsv4_lab.compilation import compile_model
        fwd = compile_model(model, regional=True)
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):                               # warm-up (Triton compiles, allocator)
        with amp:
            out = fwd(x, y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        with amp:
            out = fwd(x, y)
        out.loss.backward()
        with record_function("e2e::optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3                   # under the profiler: an upper bound
    from torch.autograd import DeviceType
    evs = [e for e in prof.events() if e.device_type == DeviceType.CPU]   # kernels count via their CPU op
    dev = (lambda e: e.self_device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)
    ranges = [(e.name[5:], e.time_range.start, e.time_range.end, e.thread) for e in evs if e.name.startswith("e2e::")]

    def comp_of(e):
        hit = {name for name, s, t, th in ranges if th == e.thread and s <= e.time_range.start and e.time_range.end <= t}
        return next((c for c in COMPONENTS if c in hit), None)

    seq_comp, totals = {}, {c: 0.0 for c in COMPONENTS + ("other",)}
    by_comp = {c: {} for c in totals}                # component -> op name -> self device time (us)

    def add(comp, e, t):
        totals[comp] += t
        if t > 0:
            by_comp[comp][e.name[:100]] = by_comp[comp].get(e.name[:100], 0.0) + t
    bwd = [e for e in evs if e.name.startswith("autograd::engine::evaluate_function")]
    bwd_ids = set()
    for e in bwd:                                    # every op under a backward node belongs to that node
        stack = list(e.cpu_children)
        while stack:
            c = stack.pop()
            bwd_ids.add(id(c))
            stack.extend(c.cpu_children)
    for e in evs:
        if e.name.startswith("autograd::engine") or id(e) in bwd_ids:
            continue
        c = comp_of(e)
        if c is not None and getattr(e, "sequence_nr", -1) is not None and e.sequence_nr >= 0:
            seq_comp.setdefault(e.sequence_nr, c)
        add(c or "other", e, dev(e))
    for e in bwd:                                    # backward node -> its forward op's component
        comp = seq_comp.get(e.sequence_nr, "other")
        for c in [e] + _subtree(e):
            add(comp, c, dev(c))
    tot = sum(totals.values())
    # the single ops and kernels that cost most (self time, summed over calls): where inside a component to look
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    avg = sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True)
    top = [{"name": a.key[:120], "ms": getattr(a, key) / 1e3, "calls": a.count} for a in avg[:TOP_OPS]
           if getattr(a, key) > 0]
    table, fam = kernel_table(), {}
    for e in evs:                                    # every op's self device time once
        f = kernel_family(e.name, table)
        fam[f] = fam.get(f, 0.0) + dev(e) / 1e3
    return {"ctx": ctx, "batch": B, "preset": preset, "mode": mode, "wall_ms": wall_ms,
            "time": "device (CUDA kernel) time" if device == "cuda" else "CPU self time (CPU smoke run)",
            "ms": {k: v / 1e3 for k, v in totals.items()}, "frac": {k: v / max(tot, 1e-9) for k, v in totals.items()},
            "total_ms": tot / 1e3, "top_ops": top,
            "ms_by_kernel_family": dict(sorted(fam.items(), key=lambda kv: -kv[1])),
            "top_ops_by_component": {c: [[n, round(t / 1e3, 3)] for n, t in sorted(d.items(), key=lambda kv: -kv[1])[:12]]
                                     for c, d in by_comp.items()}}


def _subtree(e):
    out, stack = [], list(e.cpu_children)
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(c.cpu_children)
    return out


# --------------------------------------------------------------------------------------------------------------
# the driver: subprocess per measurement, results merged as they arrive
# --------------------------------------------------------------------------------------------------------------

def _load(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _write(path, obj):
    from dsv4_lab.runlog import atomic_write_bytes    # never a half-written file
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


ALL_CTXS = (4096, 16384, 65536)


def summary_keys(runs: dict, ctxs) -> dict:
    """The summary.json keys from the per-measurement runs: best setting per (arm, context), a setting being a mode
    of the arm or of one of its variants ("v4-bf16-index": the v4 arm with overrides), named in e2e_best_settings
    ("blocks", or "blocks, index_score_dtype=bf16"). Every context measured so far counts, also those of earlier
    calls (a call may measure a subset)."""
    tps, mem, best = {}, {}, {}
    for arm in MAIN_ARMS:
        variants = [a for a in ARMS if a == arm or a.startswith(arm + "-")]
        for ctx in ctxs:
            cands = [(a, runs.get(f"{a}_{ctx}_{m}", {})) for a in variants for m in MODES]
            cands = [(a, r) for a, r in cands if "tokens_per_s" in r]
            if not cands:
                continue
            a, r = max(cands, key=lambda ar: ar[1]["tokens_per_s"])
            tps.setdefault(arm, {})[str(ctx)] = r["tokens_per_s"]
            mem.setdefault(arm, {})[str(ctx)] = r["peak_mem_gb"]
            best.setdefault(arm, {})[str(ctx)] = ", ".join([r["mode"], *ARMS[a].split()[1:]])
    ratio = {c: tps["v4"][c] / tps["dense"][c] for c in tps.get("v4", {}) if c in tps.get("dense", {})}
    return {"e2e_tokens_per_s": tps, "e2e_peak_mem_gb": mem, "e2e_v4_over_dense": ratio, "e2e_best_settings": best}


def _merge_summary(keys: dict):
    path = os.path.join(RESULTS, "summary.json")
    s = _load(path, {})
    s.update(keys)
    _write(path, s)


def _child(args_list, cap):
    """Run this file with args_list in a subprocess, capped at `cap` s; its JSON result or an error record."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *args_list, "--child-out", out],
                           timeout=cap, capture_output=True, text=True)
        r = _load(out, None)
        if r is None:
            r = {"error": f"child rc={p.returncode}: {(p.stderr or p.stdout)[-600:]}"}
    except subprocess.TimeoutExpired:
        r = {"error": f"wall-clock cap: {cap} s"}
    finally:
        with contextlib.suppress(OSError):
            os.remove(out)
    r["wall_s"] = time.time() - t0
    return r


def expected_s(runs: dict, arm: str, mode: str) -> float:
    """Wall time to plan for one (arm, mode) point: the longest finished point of that arm and mode on record (any
    context; the first point of a call pays the cold compile and autotune, e.g. 173-194 s for V4 `blocks` where a
    warm one took 136 s), 0 when none is. `--budget` starts no point that is not expected to fit."""
    done = [r["wall_s"] for k, r in runs.items()
            if k.startswith(f"{arm}_") and k.endswith(f"_{mode}") and "tokens_per_s" in r and "wall_s" in r]
    return max(done, default=0.0)


def main(out_dir=None, ctxs=(4096, 16384, 65536), arms=MAIN_ARMS, modes=MODES, warmup=3, steps=6, cap=300.0, fresh=False,
         budget=None, profile_ctx=16384, breakdown_only=False, arm_modes=None):
    """arm_modes: {arm: (mode, ...)} for the arms measured in other modes than `modes` (--arm-modes)."""
    from common import env_info
    from dsv4_lab.runlog import git_commit
    t_start = time.time()
    path = os.path.join(RESULTS, "e2e.json")
    res = {} if fresh else _load(path, {})
    if res.get("format") != 2:                       # results of the earlier three-arm table are not reused
        res = {}
    res.update({"format": 2, "what": "training throughput, small (V4) vs small-dense, best of eager / compiled "
                                     "(bench_e2e.py docstring)", "tokens_per_step": TOKENS_PER_STEP,
                "arms": dict(ARMS), "env": env_info()})
    runs = res.setdefault("runs", {})
    plan = [] if breakdown_only else [(a, c, m) for c in ctxs for a in arms
                                      for m in (arm_modes or {}).get(a, modes)]
    for arm, ctx, mode in plan:
        key = f"{arm}_{ctx}_{mode}"
        if key in runs and "tokens_per_s" in runs[key]:
            continue                                 # measured by an earlier call
        left = None if budget is None else budget - (time.time() - t_start)
        need = expected_s(runs, arm, mode)
        if left is not None and left < max(30.0, need):
            print(f"e2e budget: {left:.0f} s left, a {arm} {mode} point took up to {need:.0f} s; skipping", key,
                  flush=True)
            continue
        this_cap = cap if left is None else min(cap, left - 5)
        r = _child(["--measure", ARMS[arm], str(ctx), mode, str(warmup), str(steps)], this_cap)
        r.update(git_commit(os.path.dirname(HERE)), time=time.strftime("%Y-%m-%d %H:%M:%S"))
        runs[key] = r                                # each point names its code (commit, dirty) and time
        print("e2e", key, {k: v for k, v in r.items() if k not in ("step_ms_all", "layer_types", "traceback")}, flush=True)
        res["summary"] = summary_keys(runs, ALL_CTXS)
        _write(path, res)
        _merge_summary(res["summary"])
    if "breakdown" not in res or "error" in res.get("breakdown", {}) or breakdown_only:
        left = None if budget is None else budget - (time.time() - t_start)
        if left is None or left > 60:
            r = _child(["--breakdown", str(profile_ctx)], cap if left is None else min(cap, left - 5))
            r.update(git_commit(os.path.dirname(HERE)), time=time.strftime("%Y-%m-%d %H:%M:%S"))  # as each point
            res["breakdown"] = r
            print("e2e breakdown", {k: v for k, v in r.items() if k != "traceback"}, flush=True)
    res["summary"] = summary_keys(runs, ALL_CTXS)
    if "ms" in res.get("breakdown", {}):
        res["summary"]["e2e_v4_breakdown"] = res["breakdown"]
    _write(path, res)
    _merge_summary(res["summary"])
    if out_dir:
        _write(os.path.join(out_dir, "e2e.json"), res)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--arms", nargs="*", default=list(MAIN_ARMS), choices=list(ARMS),
                    help="default v4 dense; a variant (v4-bf16-index) only when named")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--arm-modes", nargs="*", default=[], metavar="ARM=MODE[,MODE]",
                    help="an arm's own modes instead of --modes, e.g. v4=blocks dense=compiled")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cap", type=float, default=300.0, help="wall-clock cap of one measurement (s)")
    ap.add_argument("--budget", type=float, default=None, help="start no measurement after this many s, nor one expected to overrun them (expected_s)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--profile-ctx", type=int, default=16384)
    ap.add_argument("--breakdown-only", action="store_true")
    ap.add_argument("--measure", nargs=5, metavar=("PRESET", "CTX", "MODE", "WARMUP", "STEPS"))
    ap.add_argument("--breakdown", type=int, metavar="CTX")
    ap.add_argument("--breakdown-device", default="cuda")
    ap.add_argument("--breakdown-mode", default="eager", choices=("eager", "blocks"))
    ap.add_argument("--child-out")
    a = ap.parse_args()
    arm_modes = {}
    for spec in a.arm_modes:
        arm, _, ms = spec.partition("=")
        bad = [m for m in ms.split(",") if m not in MODES]
        if arm not in ARMS or not ms or bad:
            ap.error(f"--arm-modes {spec!r}: allowed ARM=MODE[,MODE] with ARM one of {', '.join(ARMS)} and MODE one "
                     f"of {', '.join(MODES)}")
        arm_modes[arm] = tuple(ms.split(","))
    if a.breakdown_mode == "blocks" and a.breakdown_device != "cuda":
        ap.error(f"--breakdown-mode blocks with --breakdown-device {a.breakdown_device!r}: allowed only with cuda")
    if a.measure or a.breakdown:
        sys.path.insert(0, os.path.dirname(HERE))
        try:
            if a.measure:
                p, c, m, w, s = a.measure
                r = measure(p, int(c), {"compiled": True, "blocks": "blocks", "graph": "graph"}.get(m, False), int(w),
                            int(s), guard_s=60.0)
            else:
                r = breakdown(a.breakdown, a.breakdown_mode, device=a.breakdown_device)
        except Exception as e:                                            # noqa: BLE001
            import traceback
            r = {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback": traceback.format_exc()[-1500:]}
        if a.child_out:
            _write(a.child_out, r)
        else:
            print(json.dumps(r, indent=1))
    else:
        main(None, tuple(a.ctx), tuple(a.arms), tuple(a.modes), a.warmup, a.steps, a.cap, a.fresh, a.budget,
             a.profile_ctx, a.breakdown_only, arm_modes)
