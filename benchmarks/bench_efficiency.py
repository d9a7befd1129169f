"""Measured efficiency curves: `small` (DeepSeek-V4 at lab size) against `small-dense` on one GPU, vs context length.
The paper's teaser (docs §A), measured on our own model; drawn beside the analytic curves of dsv4_lab.accounting by
dsv4_lab/figures/efficiency_measured.py (`make reproduce` redraws it from the committed JSON, no GPU needed).

The H200 command (one device call, ~8 minutes; resumable: a second call measures only what is missing):

    PYTHONPATH=$PWD timeout 570 python3 benchmarks/bench_efficiency.py --budget 450 --train-mode v4=blocks \\
        dense=compiled --eager-above 16384 --commit <git sha of the checkout>;
    cp benchmarks/results/efficiency_measured.json benchmarks/results/efficiency_measured.log $OUT/

`--plan` prints the points and their expected cost without measuring. Expected costs (s, H200, cold caches), from
bench_e2e runs 15-16 and issue 15's table where measured (training), from a model of the cached reference decode
path otherwise (kv / forward / prefill / decode: guesses until this script's first run replaces them):

    group            points                                                          expected s
    v4 inference     kv and kv_paper 4K-1M, forward / prefill 4K-128K, decode 4K-1M     ~ 84  (45 of Triton JIT)
    dense inference  the same points                                                    ~ 47
    v4 train eager   4K 16K 64K 128K (136 k tok/s at 4K; first step ~50 s JIT + autotune) ~ 120
    dense train      4K 16K compiled (1063 k tok/s at 4K; ~60 s compile each), 64K 128K eager ~ 184
    total (+ ~10 s of driver start-up)                                                    ~ 434

What is measured (one record per (arm, measurement, context) point):
  kv       bytes the KV cache holds for one sequence of ctx tokens (storage --storage): every tensor the cache
           object holds, each storage once; `cache.nbytes()`; on CUDA also the allocator's delta. No forward pass.
  kv_paper the same in the paper's storage (FP8 E4M3 + BF16 RoPE dims, MXFP4 indexer keys, docs §6.3).
  train    one optimizer step, fwd + bwd + AdamW under bf16 autocast (bench_e2e.measure): tokens/s (median of
           --steps after --warmup) and peak memory. 65,536 tokens per step (batch = 65536 / ctx); above 64K one
           sequence per step (131,072 tokens at 128K). Mode per arm (--train-mode); --eager-above N runs eager above
           context N (compiling the dense model costs ~60 s per context, and at long context its step is SDPA flash
           attention, where compile gained 1.19x at 64K in issue 15's table).
  forward  no-grad forward of one sequence on the training path (Triton kernels for V4, SDPA for dense), no cache:
           what prefill costs without the cache (median of 3 after a warm-up).
  prefill  one sequence prefilled into a fresh cache in chunks of --prefill-chunk through the inference API
           (`model(chunk, cache=cache)`, docs §6.2), done twice into fresh caches and the second one timed (the
           first, `first_s`, meets every cache length of the context first: compilation, autotuning, allocation): on CUDA the same query-major Triton
           kernels as `forward` (dense: SDPA with an explicit mask after the first chunk), so CSA attends window +
           top-k per query while dense attention, HCA and the indexer's scores are quadratic in context; each chunk
           also reads every stored entry back from the cache (in PyTorch).
  decode   median ms per token of --decode-steps single-token steps (after --decode-warm), batch 1, on the cache of
           the prefill of the same context when that prefill is in the plan and succeeded (cache_fill "prefill"),
           else on a cache filled synthetically to ctx (cache_fill "synthetic": length set, stored values random; the
           cached step reads every stored entry whatever its value, so the cost is the same).
GPU runs: bf16 autocast, cache storage bf16. `--device cpu --tiny` runs the `tiny` / `tiny-dense` presets at
32-128 tokens in fp32 on one thread (the CPU smoke test, tests/test_efficiency_measured.py).

Robust and budgeted: points run in child processes, one per (arm, train | inference) group, each point under its own
wall-clock cap (the driver kills the child when a point overruns and starts a new child for the rest of the group);
an out-of-memory point is recorded and the same measurement at larger contexts is skipped with that reason; every
finished point is merged into the JSON at once (dsv4_lab.runlog.atomic_write_bytes); a rerun skips finished points
(--retry-errors retries failed ones, --remeasure KIND... measures again the points of those kinds taken at another
commit, --fresh starts over); --budget S starts no point whose expected cost exceeds
what is left. Output: benchmarks/results/efficiency_measured.json (+ .log), with settings, environment, GPU name and
the commit.

    python benchmarks/bench_efficiency.py [--budget S] [--arms v4 dense]
        [--kinds kv kv_paper train forward prefill decode] [--ctx-train 4096 ...] [--ctx-forward ...]
        [--ctx-prefill ...] [--ctx-decode ...] [--ctx-kv ...] [--ctx-kv_paper ...] [--storage fp32|bf16|paper]
        [--train-mode v4=eager dense=compiled] [--eager-above N] [--cap S] [--plan] [--fresh] [--retry-errors]
        [--device cpu --tiny] [--out PATH] [--commit SHA]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from bench_e2e import ARMS, MAIN_ARMS, _load, _write  # noqa: E402  (the arms and JSON helpers of the e2e benchmark)

DEFAULT_OUT = os.path.join(HERE, "results", "efficiency_measured.json")
TINY_ARMS = {"v4": "tiny", "dense": "tiny-dense"}
KINDS = ("kv", "kv_paper", "train", "forward", "prefill", "decode")
FAMILY = {"kv": "inference", "kv_paper": "inference", "forward": "inference", "prefill": "inference",
          "decode": "inference", "train": "train"}
LONG = (4096, 16384, 65536, 131072, 262144, 1048576)
GPU_CTX = {"kv": LONG, "kv_paper": LONG, "train": (4096, 16384, 65536, 131072),
           "forward": (4096, 16384, 65536, 131072), "prefill": (4096, 16384, 65536, 131072),
           "decode": LONG}
TINY_CTX = {"kv": (32, 64, 128), "kv_paper": (32, 64, 128), "train": (32, 64), "forward": (32, 64), "prefill": (32, 64),
            "decode": (32, 64, 128)}
FORMAT = 1
STARTUP_CAP_S = 300.0                  # a child's imports, model build and warm-up (V4: Triton JIT of the cached path)


class BadInput(ValueError):
    """A bad argument or result file; main() prints it as one line and exits 2."""


# --------------------------------------------------------------------------------------------------------------
# settings and the plan
# --------------------------------------------------------------------------------------------------------------

def settings_of(a) -> dict:
    """Everything that changes what a point means; a rerun must use the same (or --fresh)."""
    gpu = a.device == "cuda"
    return {"device": a.device, "arms": dict(TINY_ARMS) if a.tiny else {k: ARMS[k] for k in MAIN_ARMS},
            "tokens_per_step": 65536 if not a.tiny else 64, "train_warmup": a.warmup, "train_steps": a.steps,
            "train_mode": a.train_mode if gpu else {arm: "eager" for arm in a.train_mode},   # compile=auto: CPU eager
            "eager_above": a.eager_above, "amp": "bf16" if gpu else "none",
            "storage": a.storage or ("bf16" if gpu else "fp32"),
            "prefill_chunk": a.prefill_chunk or (4096 if gpu else 16),
            "decode_warm": a.decode_warm, "decode_steps": a.decode_steps}


def train_mode(s: dict, arm: str, ctx: int) -> str:
    mode = s["train_mode"].get(arm, "eager")
    return "eager" if s["eager_above"] is not None and ctx > s["eager_above"] else mode


def key(arm: str, kind: str, ctx: int) -> str:
    return f"{arm}/{kind}/{ctx}"


def build_plan(a, s: dict) -> list[dict]:
    """Points in run order: per arm its inference group (kv, forward, prefill, decode by context), then per arm its
    training group. Consecutive points of one (arm, family) share a child process."""
    ctxs = {k: getattr(a, f"ctx_{k}") or (TINY_CTX if a.tiny else GPU_CTX)[k] for k in KINDS}
    plan = []
    for family in ("inference", "train"):
        for arm in a.arms:
            for ctx in sorted({c for k in KINDS if FAMILY[k] == family and k in a.kinds for c in ctxs[k]}):
                for kind in KINDS:
                    if FAMILY[kind] == family and kind in a.kinds and ctx in ctxs[kind]:
                        p = {"arm": arm, "kind": kind, "ctx": ctx, "key": key(arm, kind, ctx)}
                        if kind == "train":
                            p["mode"] = train_mode(s, arm, ctx)
                        plan.append(p)
    return plan


# Expected seconds of one point (for --budget and the per-point cap). Training: bench_e2e runs 15-16 and issue 15's
# table (H200); the rest: a model of the cached reference path (guesses until measured).
TPS = {("v4", "eager"): {4096: 136e3, 16384: 130e3, 65536: 125e3, 131072: 110e3},
       ("v4", "compiled"): {4096: 200e3, 16384: 190e3, 65536: 180e3, 131072: 160e3},      # guess: never finished
       ("v4", "blocks"): {4096: 190e3, 16384: 180e3, 65536: 170e3, 131072: 150e3},        # 4K measured, rest guesses
       ("dense", "compiled"): {4096: 1063e3, 16384: 432e3, 65536: 140e3, 131072: 73e3},
       ("dense", "eager"): {4096: 425e3, 16384: 278e3, 65536: 118e3, 131072: 60e3}}


def _nearest(table: dict, ctx: int) -> float:
    return table[min(table, key=lambda c: abs(c - ctx))]


def startup_s(s: dict) -> float:
    """A new child: python + torch (+ CUDA) imports and the model build."""
    return 8.0 if s["device"] == "cuda" else 4.0


def expected_s(p: dict, s: dict, first_of_arm_kind: bool) -> float:
    """Expected seconds of one point inside a running child."""
    n, arm, kind = p["ctx"], p["arm"], p["kind"]
    if s["device"] != "cuda":
        return {"train": 15.0, "forward": 2.0, "prefill": 2.0, "decode": 2.0, "kv": 0.5, "kv_paper": 0.5}[kind]
    if kind in ("kv", "kv_paper"):
        return 1.0
    if kind == "train":
        tokens = max(n, s["tokens_per_step"])
        steps = (s["train_warmup"] + s["train_steps"]) * tokens / _nearest(TPS[(arm, p["mode"])], n)
        compile_s = 60.0 if p["mode"] in ("compiled", "blocks") else (50.0 if arm == "v4" and first_of_arm_kind else 8.0)
        return 4.0 + steps + compile_s
    if kind == "forward":
        one = n / (3 * _nearest(TPS[(arm, "eager")], n))
        return 4 * one + (45.0 if arm == "v4" and first_of_arm_kind else 1.0)   # V4: Triton JIT
    if kind == "prefill":                                                 # (n^2 / 2) x heads x ~24 B of scores
        quad = (8 * 8 if arm == "dense" else 3 * 12 / 4) * n * n / 2 * 24 / 2e12
        return 2 * (quad + n / s["prefill_chunk"] * (0.01 if arm == "dense" else 0.03)) + 1.0   # two passes
    ms = 2.5 + 13 * n / 2**20 if arm == "dense" else 6.0 + 1.5 * n / 2**20  # decode ms per token
    return (s["decode_warm"] + s["decode_steps"]) * ms / 1e3 + 1.0


def costed(plan: list[dict], s: dict) -> list[tuple[dict, float]]:
    """(point, expected s) in plan order, without child start-up."""
    out, seen = [], set()
    for p in plan:
        out.append((p, expected_s(p, s, (p["arm"], p["kind"]) not in seen)))
        seen.add((p["arm"], p["kind"]))
    return out


def groups_of(todo: list) -> list[list]:
    """Consecutive (point, cost) pairs of one (arm, family): one child process each."""
    out = []
    for pc in todo:
        g = (pc[0]["arm"], FAMILY[pc[0]["kind"]])
        if out and (out[-1][0][0]["arm"], FAMILY[out[-1][0][0]["kind"]]) == g:
            out[-1].append(pc)
        else:
            out.append([pc])
    return out


# --------------------------------------------------------------------------------------------------------------
# the inference API, in one place (adapt here if dsv4_lab.inference changes)
# --------------------------------------------------------------------------------------------------------------

def new_cache(model, max_len: int, storage: str):
    """An empty cache for one sequence of up to max_len tokens."""
    return model.new_cache(1, max_len, storage=storage)


def cached_forward(model, ids, cache):
    """Feed ids (1, T) at the cache's current length; the cache advances by T."""
    return model(ids, cache=cache, last_only=True)


def fill_synthetic(cache, n: int) -> None:
    """Make `cache` hold n tokens without a prefill: length set to n, every floating-point value random (the cached
    step reads all stored entries whatever their values, so a decode step costs what it costs after a prefill)."""
    import torch
    for t in cache_tensors(cache):
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, device=t.device).to(t.dtype))
    cache.length = n


def cache_tensors(cache) -> list:
    """Every tensor the cache object holds (through attributes, lists, dicts; never into a module), each once."""
    import torch
    out, seen, stack = [], set(), [cache]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, (torch.nn.Module, type)):
            stack.extend(vars(o).values())
    return out


def cache_bytes(cache) -> dict:
    storages = {}
    for t in cache_tensors(cache):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    r = {"bytes_tensors": sum(storages.values()), "n_tensors": len(storages)}
    try:
        r["bytes_nbytes"] = int(cache.nbytes(include_state=True))
        r["bytes_state"] = r["bytes_nbytes"] - int(cache.nbytes(include_state=False))
    except (AttributeError, TypeError):                                   # a cache without nbytes(): tensors only
        pass
    r["capacity_tokens"] = int(getattr(cache, "max_len", 0)) or None
    return r


# --------------------------------------------------------------------------------------------------------------
# measurements (child process)
# --------------------------------------------------------------------------------------------------------------

class Child:
    """One child process: the points of one (arm, family) group, results appended to a JSONL file."""

    def __init__(self, spec: dict):
        import torch
        self.torch, self.s, self.out = torch, spec["settings"], spec["out"]
        self.dev = self.s["device"]
        self.cuda = self.dev == "cuda"
        if not self.cuda:
            torch.set_num_threads(1)                                   # CPU smoke: one thread, as figures/efficiency
        torch.manual_seed(0)

    def emit(self, **ev):
        with open(self.out, "a") as f:
            f.write(json.dumps(ev) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def amp(self):
        import contextlib
        if self.s["amp"] == "bf16":
            return self.torch.autocast(self.dev, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def peak_reset(self):
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def free(self):
        import gc
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # ---- training ---------------------------------------------------------------------------------------------
    def train(self, p: dict) -> dict:
        import bench_e2e
        preset = self.s["arms"][p["arm"]]
        r = bench_e2e.measure(preset, p["ctx"], {"compiled": True, "blocks": "blocks"}.get(p["mode"], False),
                              self.s["train_warmup"],
                              self.s["train_steps"], guard_s=120.0, device=self.dev,
                              tokens_per_step=self.s["tokens_per_step"])
        self.torch._dynamo.reset()
        r.pop("layer_types", None)
        return r

    # ---- inference --------------------------------------------------------------------------------------------
    def model(self, arm: str, max_len: int):
        from dsv4_lab import DSV4LM, ModelConfig
        cfg = ModelConfig.from_preset(self.s["arms"][arm])
        cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len))
        return DSV4LM(cfg).to(self.dev).eval()

    def kv(self, model, n: int, storage: str) -> dict:
        base = self.torch.cuda.memory_allocated() if self.cuda else 0
        cache = new_cache(model, n, storage)
        self.sync()
        r = {"storage": storage, **cache_bytes(cache)}
        if self.cuda:
            r["bytes_allocator"] = self.torch.cuda.memory_allocated() - base
        return r

    def forward(self, model, ids, n: int) -> dict:
        times = []
        self.peak_reset()
        for i in range(4):                                                 # 1 warm-up + 3 timed
            self.sync()
            t0 = time.perf_counter()
            with self.torch.no_grad(), self.amp():
                model(ids[:, :n])
            self.sync()
            times.append(time.perf_counter() - t0)
        t = sorted(times[1:])[1]
        return {"forward_s": t, "tokens_per_s": n / t, "first_s": times[0], "peak_mem_gb": self.peak_gb()}

    def prefill(self, model, ids, n: int, extra: int):
        chunk = self.s["prefill_chunk"]

        def one_pass():                                                    # a fresh cache, every chunk, timed
            cache = new_cache(model, n + extra, self.s["storage"])
            self.sync()
            t0 = time.perf_counter()
            with self.torch.no_grad(), self.amp():
                for s0 in range(0, n, chunk):
                    cached_forward(model, ids[:, s0:min(n, s0 + chunk)], cache)
            self.sync()
            return cache, time.perf_counter() - t0
        # the whole prefill twice, the second one timed: the first meets every cache length (and so every kernel
        # specialisation and autotune key) of this context for the first time and allocates its buffers
        warm, first = one_pass()
        del warm
        self.peak_reset()
        cache, t = one_pass()
        return cache, {"prefill_s": t, "tokens_per_s": n / t, "first_s": first, "chunk": chunk,
                       "peak_mem_gb": self.peak_gb(), "storage": self.s["storage"], **cache_bytes(cache)}

    def decode(self, model, ids, n: int, cache, fill: str) -> dict:
        times = []
        self.peak_reset()
        with self.torch.no_grad(), self.amp():
            for i in range(self.s["decode_warm"] + self.s["decode_steps"]):
                self.sync()
                t0 = time.perf_counter()
                cached_forward(model, ids[:, n + i:n + i + 1], cache)
                self.sync()
                times.append(time.perf_counter() - t0)
        ms = sorted(t * 1e3 for t in times[self.s["decode_warm"]:])
        return {"ms_per_token": ms[len(ms) // 2], "ms_all": ms, "cache_fill": fill, "peak_mem_gb": self.peak_gb(),
                "storage": self.s["storage"], **cache_bytes(cache)}

    def setup_inference(self, points: list[dict]):
        extra = self.s["decode_warm"] + self.s["decode_steps"] + 1
        top = max(p["ctx"] for p in points) + extra
        self.extra = extra
        self.net = self.model(points[0]["arm"], top)
        self.ids = self.torch.randint(0, self.net.cfg.vocab_size, (1, top), device=self.dev)
        self.prefilled = None                                              # (ctx, cache) of the last prefill
        with self.torch.no_grad(), self.amp():                             # warm-up: kernels, allocator
            cached_forward(self.net, self.ids[:, :16], new_cache(self.net, 16, self.s["storage"]))

    def infer(self, p: dict) -> dict:
        kind, n, model, ids = p["kind"], p["ctx"], self.net, self.ids
        last, self.prefilled = self.prefilled, None
        if not (kind == "decode" and last is not None and last[0] == n):
            last = None                                                    # free an earlier prefill's cache
            self.free()
        if kind in ("kv", "kv_paper"):
            return self.kv(model, n, "paper" if kind == "kv_paper" else self.s["storage"])
        if kind == "forward":
            return self.forward(model, ids, n)
        if kind == "prefill":
            cache, rec = self.prefill(model, ids, n, self.extra)
            self.prefilled = (n, cache)
            return rec
        if last is not None:                                               # decode after the prefill of ctx n
            return self.decode(model, ids, n, last[1], "prefill")
        cache = new_cache(model, n + self.extra, self.s["storage"])
        fill_synthetic(cache, n)
        return self.decode(model, ids, n, cache, "synthetic")

    def run(self, points: list[dict]):
        """Every point: start event, measurement, done event. An exception is that point's error record; an
        out-of-memory error also skips the same measurement at larger contexts."""
        torch = self.torch
        inference = FAMILY[points[0]["kind"]] == "inference"
        if inference:
            self.setup_inference(points)
        oom: dict[str, int] = {}
        for p in points:
            kind, n = p["kind"], p["ctx"]
            self.emit(event="start", key=p["key"], t=time.time())
            t0 = time.time()
            if kind in oom and n > oom[kind]:
                rec = {"status": "skipped", "reason": f"not attempted: {kind} at context {oom[kind]} ran out of memory"}
            else:
                try:
                    rec = self.infer(p) if inference else self.train(p)
                    rec["status"] = "error" if "error" in rec else "ok"
                    if "OutOfMemoryError" in rec.get("error", ""):
                        oom[kind] = n
                except torch.OutOfMemoryError as e:
                    oom[kind] = n
                    self.prefilled = None
                    rec = {"status": "error", "error": f"OutOfMemoryError: {str(e)[:200]}"}
                except Exception as e:                                     # noqa: BLE001 (recorded, next point)
                    import traceback
                    self.prefilled = None
                    rec = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}",
                           "traceback": traceback.format_exc()[-1500:]}
            rec.update(arm=p["arm"], kind=kind, ctx=n, preset=self.s["arms"][p["arm"]], wall_s=time.time() - t0)
            if "mode" in p:
                rec.setdefault("mode", p["mode"])
            self.emit(event="done", key=p["key"], record=rec)
            self.free()


def child_main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    c = Child(spec)
    try:
        c.run(spec["points"])
    except Exception as e:                                                # noqa: BLE001 (recorded by the driver)
        import traceback
        c.emit(event="crash", error=f"{type(e).__name__}: {str(e)[:300]}", traceback=traceback.format_exc()[-1500:])
        raise


# --------------------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------------------

class Driver:
    def __init__(self, a, s: dict):
        self.a, self.s = a, s
        self.path = a.out
        self.log_path = os.path.splitext(a.out)[0] + ".log"
        self.t0 = time.time()
        from dsv4_lab import ModelConfig
        self.configs = {arm: ModelConfig.from_preset(p).to_dict() for arm, p in s["arms"].items()}
        self.res = self.load()

    def log(self, msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def load(self) -> dict:
        if self.a.fresh or not os.path.exists(self.path):
            return {}
        res = _load(self.path, None)
        if not isinstance(res, dict) or res.get("format") != FORMAT or not isinstance(res.get("points"), dict):
            raise BadInput(f"{self.path}: not an efficiency_measured result file of format {FORMAT} (unreadable JSON "
                           "or no 'points' object); move it away or pass --fresh")
        old = res.get("settings", {})
        for k, v in self.s.items():
            if k in old and old[k] != v:
                raise BadInput(f"{self.path}: settings.{k} = {old[k]!r} there, {v!r} asked; rerun with the same "
                               "settings or pass --fresh")
        for arm, cfg in self.configs.items():                             # the presets changed since then
            for k, v in cfg.items():
                was = res.get("configs", {}).get(arm, {}).get(k, v)
                if was != v:
                    raise BadInput(f"{self.path}: configs.{arm}.{k} = {was!r} there, the preset now gives {v!r}; "
                                   "those points measured another model: pass --fresh")
        return res

    def save(self):
        _write(self.path, self.res)

    def header(self):
        from common import env_info

        from dsv4_lab.runlog import commit_label
        env = env_info()
        env["commit"] = self.a.commit or commit_label(ROOT) or "unknown (no git; pass --commit)"
        env["device_kind"] = self.s["device"]
        self.res.update({"format": FORMAT, "what": "measured efficiency vs context, V4 vs dense "
                                                   "(benchmarks/bench_efficiency.py docstring)",
                         "settings": self.s,
                         "configs": self.configs})
        self.res.setdefault("points", {})
        self.res.setdefault("calls", []).append(env)
        self.res["env"] = env

    def todo(self, plan):
        pts = self.res.get("points", {})
        retry = ("error", "skipped") if self.a.retry_errors else ()
        commit = self.res["env"]["commit"]
        return [p for p in plan if p["key"] not in pts or pts[p["key"]].get("status") in retry
                or (p["kind"] in self.a.remeasure and pts[p["key"]].get("commit") != commit)]

    def left(self) -> float | None:
        return None if self.a.budget is None else self.a.budget - (time.time() - self.t0)

    def run(self, plan):
        todo = costed(self.todo(plan), self.s)
        groups = groups_of(todo)
        total = sum(c for _, c in todo) + len(groups) * startup_s(self.s)
        self.log(f"{len(plan) - len(todo)} of {len(plan)} points already measured; {len(todo)} to go, expected "
                 f"{total:.0f} s" + (f", budget {self.a.budget:.0f} s" if self.a.budget is not None else ""))
        for group in groups:
            self.run_group(group)
        n_ok = sum(1 for r in self.res["points"].values() if r.get("status") == "ok")
        self.log(f"done: {n_ok} of {len(self.res['points'])} recorded points ok; {self.path}")

    def run_group(self, group):
        """Run the points of one (arm, family) in child processes; a point that overruns its cap is recorded as
        such, the child killed, and the rest of the group continues in a new child."""
        while group:
            left = self.left()
            fits, acc = [], startup_s(self.s)
            for p, c in group:
                if left is not None and acc + c > left:
                    break
                fits.append((p, c))
                acc += c
            if not fits:
                for p, c in group:
                    self.log(f"budget: skipping {p['key']} (expected {c:.0f} s + start-up, "
                             f"{max(left or 0, 0):.0f} s left)")
                return
            done = self.child([p for p, _ in fits], {p["key"]: c for p, c in fits})
            if not done:
                return                                                    # no progress (logged by child())
            group = [(p, c) for p, c in group if p["key"] not in done]

    def cap(self, key: str | None, expected: float) -> float:
        """Wall-clock cap of point `key` (None: a child's start-up, which has no --cap), never past the budget."""
        cap = self.a.cap if self.a.cap and key is not None else max(60.0, 3 * expected)
        left = self.left()
        return cap if left is None else max(1.0, min(cap, left))

    def child(self, points, expected: dict) -> set:
        fd, out = tempfile.mkstemp(suffix=".jsonl", prefix="eff_")
        os.close(fd)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"settings": self.s, "points": points, "out": out}, f)
            spec = f.name
        env = dict(os.environ)
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")                   # autotune results shared by children
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        errf = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec], env=env,
                                stdout=errf, stderr=subprocess.STDOUT, start_new_session=True)
        done, pos, cur, started, killed = set(), 0, None, time.time(), False
        self.log(f"child {proc.pid}: {', '.join(p['key'] for p in points)}")
        try:
            while True:
                rc = proc.poll()
                with open(out) as f:
                    f.seek(pos)
                    chunk = f.read()
                lines = chunk.split("\n")
                pos += len(chunk) - len(lines[-1])
                for line in lines[:-1]:
                    ev = json.loads(line)
                    if ev["event"] == "start":
                        cur, started = ev["key"], time.time()
                    elif ev["event"] == "done":
                        self.record(ev["key"], ev["record"])
                        done.add(ev["key"])
                        cur, started = None, time.time()
                    elif ev["event"] == "crash":                           # outside a point: all of them
                        for k in [cur] if cur is not None else [p["key"] for p in points if p["key"] not in done]:
                            self.record(k, {"status": "error", "error": ev["error"], "traceback": ev["traceback"]})
                            done.add(k)
                        cur = None
                if rc is not None:
                    break
                cap = self.cap(cur, expected[cur]) if cur is not None else self.cap(None, STARTUP_CAP_S / 3)
                if time.time() - started > cap:                            # a point, or the start-up, overran
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed = True
                    left = self.left()
                    if left is not None and left <= 1.0:
                        self.log(f"budget spent during {cur or 'child start-up'}: not recorded, "
                                 "measured by a later call")
                    elif cur is None:
                        self.log(f"child start-up over {cap:.0f} s: killed")
                    else:
                        self.record(cur, {"status": "error", "error": f"wall-clock cap: {cap:.0f} s"})
                        done.add(cur)
                    break
                time.sleep(0.2)
            if proc.returncode not in (0, None) and not killed:
                errf.seek(0)
                tail = errf.read().decode(errors="replace")[-600:]
                if cur is not None and cur not in done:
                    self.record(cur, {"status": "error", "error": f"child rc={proc.returncode}: {tail}"})
                    done.add(cur)
                elif not done:
                    self.log(f"child {proc.pid} ended rc={proc.returncode} before its first point: {tail}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            errf.close()
            for path in (out, spec):
                os.remove(path)
        return done

    def record(self, k: str, rec: dict):
        arm, kind, ctx = k.split("/")
        rec = {"arm": arm, "kind": kind, "ctx": int(ctx), **rec, "commit": self.res["env"]["commit"]}
        old = self.res["points"].get(k)
        if old is not None and old.get("status") == "ok" and kind in self.a.remeasure:
            self.res.setdefault("superseded", {})[k] = old                # the earlier code's number stays on record
        self.res["points"][k] = rec
        self.save()
        brief = {x: (round(v, 4) if isinstance(v, float) else v) for x, v in rec.items()
                 if x not in ("traceback", "step_ms_all", "ms_all", "arm", "kind", "ctx")}
        self.log(f"{k}: {brief}")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--arms", nargs="+", default=list(MAIN_ARMS), choices=list(MAIN_ARMS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    for k in KINDS:
        ap.add_argument(f"--ctx-{k}", type=int, nargs="+", default=None, help=f"contexts of the {k} points")
    ap.add_argument("--train-mode", nargs="+", default=["v4=eager", "dense=compiled"],
                    help="ARM=compiled|blocks|eager per arm (bench_e2e's best settings: V4 blocks (regional compile), dense compiled)")
    ap.add_argument("--eager-above", type=int, default=None, help="train eager above this context (every arm)")
    ap.add_argument("--warmup", type=int, default=None, help="training warm-up steps (GPU 3, --tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (GPU 5, --tiny 2)")
    ap.add_argument("--decode-warm", type=int, default=None, help="untimed decode steps (GPU 3, --tiny 1)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (GPU 10, --tiny 3)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill call (GPU 4096, CPU 16)")
    ap.add_argument("--storage", default=None, choices=["fp32", "bf16", "paper"], help="KV cache storage")
    ap.add_argument("--budget", type=float, default=None, help="start no point that is not expected to end in S s")
    ap.add_argument("--cap", type=float, default=None, help="wall-clock cap of one point (default 3x expected, >= 60)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny / tiny-dense presets at 32-128 tokens (CPU smoke)")
    ap.add_argument("--plan", action="store_true", help="print the points and expected costs, measure nothing")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--remeasure", nargs="*", default=[], choices=list(KINDS),
                    help="measure these kinds again where the point was measured at another commit (the old point "
                         "moves to 'superseded'); a second call at the same --commit skips what the first measured")
    ap.add_argument("--retry-errors", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return a
    modes = {}
    for item in a.train_mode:
        arm, eq, mode = item.partition("=")
        if not eq or arm not in MAIN_ARMS or mode not in ("compiled", "blocks", "eager"):
            raise BadInput(f"--train-mode {item!r} is not allowed: ARM=MODE with ARM v4|dense, "
                           "MODE compiled|blocks|eager")
        modes[arm] = mode
    a.train_mode = {arm: modes.get(arm, "eager") for arm in MAIN_ARMS}
    for k in KINDS:
        for c in getattr(a, f"ctx_{k}") or ():
            if c <= 0:
                raise BadInput(f"--ctx-{k} {c} is not allowed: a positive number of tokens")
    for name, gpu, tiny in (("warmup", 3, 1), ("steps", 5, 2), ("decode_warm", 3, 1), ("decode_steps", 10, 3)):
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else gpu)
    for name in ("warmup", "decode_warm"):
        if getattr(a, name) < 0:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(a, name)} is not allowed: an integer >= 0")
    for name in ("steps", "decode_steps"):
        if getattr(a, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(a, name)} is not allowed: an integer >= 1")
    if a.prefill_chunk is not None and a.prefill_chunk < 1:
        raise BadInput(f"--prefill-chunk {a.prefill_chunk} is not allowed: a positive number of tokens")
    if a.budget is not None and a.budget < 0:
        raise BadInput(f"--budget {a.budget} is not allowed: seconds >= 0")
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cpu" and not a.tiny and not a.plan:
        raise BadInput("--device cpu measures the small presets for hours; add --tiny (or run on a GPU)")
    if a.device == "cuda" and not a.plan:
        import torch
        if not torch.cuda.is_available():
            raise BadInput("--device cuda: no CUDA device here; use --device cpu --tiny")
    return a


def main(argv=None) -> int:
    try:
        a = parse(argv)
        if a.child:
            child_main(a.child)
            return 0
        s = settings_of(a)
        plan = build_plan(a, s)
        if a.plan:
            total = 0.0
            for group in groups_of(costed(plan, s)):
                for i, (p, c) in enumerate(group):
                    c += startup_s(s) if i == 0 else 0.0
                    total += c
                    print(f"{p['key']:<24} {p.get('mode', ''):<9} expected {c:6.1f} s   cumulative {total:6.0f} s")
            return 0
        d = Driver(a, s)
        d.header()
        d.save()
        d.run(plan)
        return 0
    except BadInput as e:
        print(f"bench_efficiency: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))                # `timeout`: the child is killed too
    sys.exit(main())
