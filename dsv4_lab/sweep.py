"""Sweeps: arms x seeds under one budget, each run one papermill execution of notebooks/run.ipynb.

    python -m dsv4_lab sweep ablations/<name>.json [--scale cpu|gpu] [--jobs N] [--root runs] [--dry-run]
                                                   [--stop-after SECONDS]

A sweep file (ablations/*.json) states
    name, question, budget_type ("equal tokens" | "equal FLOPs"), budget (words), claim_boundary,
    metric {name, direction: lower|higher, method: t|bootstrap}, secondary [{name, direction, method}, ...],
    (a metric may add `scales`: the scales where it is compared, e.g. a wall-clock metric only where runs did not
    share a device; `why`: the reason, in words),
    baseline (an arm), seeds, base {key: value}, arms {arm: {key: value}},
    scales {cpu: {base: {...}, seeds: [...]}, gpu: {...}}   (per-scale overrides of base and seeds),
    optional tune {key, grid: {arm: [values]}, seeds}: the arm's value of `key` is chosen per arm as the grid
    value with the best mean metric over the tune seeds (separate selection seeds), then the arm runs at that
    value on the evaluation seeds (best LR vs best LR, docs/methodology.md §3).
Run directories: <root>/<name>/<scale>/<arm>-s<seed> (tuning runs under .../select/<arm>-<key><value>-s<seed>),
each with sweep.json (which ablation / arm / seed / scale / phase it is) and run.ipynb (the executed notebook).

Every run of every arm is resolved and validated before the first one starts (a bad key in the last arm stops
the sweep with exit code 2 before anything trains). A run is finished when its metrics.jsonl reaches the last
step and its checkpoint exists; finished runs are skipped, and so are runs that
diverged (a non-finite loss stopped them: diverged.json, reported as diverged = 1). A killed sweep restarted with the same command loses
nothing: finished runs are skipped, interrupted ones resume from their checkpoint (train.py). --jobs N runs N
at once: with several GPUs one job per GPU in turn (N > #GPUs puts several on one GPU), on CPU each job gets
cores // N threads.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from .config import ConfigError, parse_overrides
from .runlog import load_json, read_metrics, config_diff, save_json

ROOT = Path(__file__).resolve().parents[1]
RUN_NOTEBOOK = ROOT / "notebooks" / "run.ipynb"
SCALES = ("cpu", "gpu")
BUDGET_TYPES = ("equal tokens", "equal FLOPs")
DIRECTIONS = ("lower", "higher")


class SweepError(ConfigError):
    """A sweep file or a run in it is not valid (one line naming the file, field, value and what is allowed)."""


# --------------------------------------------------------------------------------------------------------------
# the sweep file
# --------------------------------------------------------------------------------------------------------------

def _need(cond: bool, path, field: str, value, allowed: str) -> None:
    if not cond:
        raise SweepError(f"sweep {path}: field '{field}' = {value!r} is not allowed: {allowed}")


def _check_metric(path, field: str, m) -> None:
    _need(isinstance(m, dict) and isinstance(m.get("name"), str), path, field, m,
          "an object {name, direction: lower|higher, method: t|bootstrap}")
    _need(m.get("direction") in DIRECTIONS, path, f"{field}.direction", m.get("direction"), f"one of {DIRECTIONS}")
    _need(m.get("method", "t") in ("t", "bootstrap"), path, f"{field}.method", m.get("method"), "t or bootstrap")
    _need(set(m) <= {"name", "direction", "method", "scales", "why"}, path, field, sorted(m),
          "keys name, direction, method, scales, why")
    _need(isinstance(m.get("scales", []), list) and set(m.get("scales", [])) <= set(SCALES), path,
          f"{field}.scales", m.get("scales"), f"a list of scales from {SCALES}")


def load_sweep(path) -> dict:
    """Read and check a sweep file's fields (not yet the configs of its runs: see plan())."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} does not exist (see ablations/*.json)") from None
    except json.JSONDecodeError as e:
        raise SweepError(f"sweep file {path} is not valid JSON: {e}") from None
    for k in ("name", "arms"):
        _need(k in d, path, k, None, "required (need name, arms; see dsv4_lab/sweep.py)")
    _need(isinstance(d["arms"], dict) and d["arms"], path, "arms", d["arms"], "a non-empty object {arm: overrides}")
    if "metric" in d:
        _check_metric(path, "metric", d["metric"])
        for i, m in enumerate(d.get("secondary", [])):
            _check_metric(path, f"secondary[{i}]", m)
        _need(d.get("baseline") in d["arms"], path, "baseline", d.get("baseline"), f"one of the arms {list(d['arms'])}")
        _need(d.get("budget_type") in BUDGET_TYPES, path, "budget_type", d.get("budget_type"), f"one of {BUDGET_TYPES}")
    for s in d.get("scales", {}):
        _need(s in SCALES, path, "scales", s, f"keys from {SCALES}")
        _need(set(d["scales"][s]) <= {"base", "seeds"}, path, f"scales.{s}", sorted(d["scales"][s]),
              "keys 'base' and 'seeds' only")
    if "tune" in d:
        t = d["tune"]
        _need(isinstance(t, dict) and {"key", "grid", "seeds"} <= set(t), path, "tune", t,
              "an object {key, grid: {arm: [values]}, seeds}")
        _need(set(t["grid"]) == set(d["arms"]), path, "tune.grid", sorted(t["grid"]), f"one list per arm {list(d['arms'])}")
        _need(not set(t["seeds"]) & set(d.get("seeds", [0])), path, "tune.seeds", t["seeds"],
              "seeds disjoint from the evaluation seeds")
    d["_path"] = str(path)
    return d


def scaled(sweep: dict, scale: str) -> tuple[dict, list[int]]:
    """The base overrides and the evaluation seeds at one scale."""
    sc = sweep.get("scales", {}).get(scale)
    if sc is None and sweep.get("scales"):
        raise SweepError(f"sweep {sweep.get('_path', sweep['name'])}: --scale {scale!r} is not allowed: "
                         f"the file defines {sorted(sweep['scales'])}")
    sc = sc or {}
    return {**sweep.get("base", {}), **sc.get("base", {})}, list(sc.get("seeds", sweep.get("seeds", [0])))


def _run(sweep, scale, root, phase, arm, seed, kv, label=None) -> dict:
    sub = Path(root) / sweep["name"] / scale
    name = f"{label or arm}-s{seed}"
    rd = sub / "select" / name if phase == "select" else sub / name
    return {"ablation": sweep["name"], "scale": scale, "phase": phase, "arm": label or arm, "family": arm,
            "seed": seed, "kv": {**kv, "seed": seed, "run_dir": str(rd.resolve()), "progress": False}}


def selection_runs(sweep: dict, scale: str = "cpu", root: str = "runs") -> list[dict]:
    if "tune" not in sweep:
        return []
    base, _ = scaled(sweep, scale)
    t = sweep["tune"]
    return [_run(sweep, scale, root, "select", arm, seed, {**base, **over, t["key"]: v}, f"{arm}-{t['key']}{v}")
            for arm, over in sweep["arms"].items() for v in t["grid"][arm] for seed in t["seeds"]]


def eval_runs(sweep: dict, scale: str = "cpu", root: str = "runs", chosen: dict | None = None) -> list[dict]:
    """The evaluation runs; with a tune block, `chosen` = {arm: value} (None: the grid's first value, used only to
    validate the configs before the selection has run)."""
    base, seeds = scaled(sweep, scale)
    out = []
    for arm, over in sweep["arms"].items():
        kv = {**base, **over}
        if "tune" in sweep:
            kv[sweep["tune"]["key"]] = (chosen or {}).get(arm, sweep["tune"]["grid"][arm][0])
        out += [_run(sweep, scale, root, "eval", arm, seed, kv) for seed in seeds]
    return out


def sweep_runs(sweep: dict, root: str = "runs", scale: str = "cpu") -> list[tuple[str, int, dict]]:
    """(arm, seed, overrides) of every run the sweep may start (selection runs first)."""
    return [(r["arm"], r["seed"], r["kv"]) for r in selection_runs(sweep, scale, root) + eval_runs(sweep, scale, root)]


def validate(sweep: dict, runs: list[dict]) -> None:
    """Resolve every run's config; SweepError naming the arm for the first bad one. Also refuse a run_dir that
    already holds a run of a different config (it would stop that arm mid-sweep)."""
    for r in runs:
        try:
            mc, tc = parse_overrides(dict(r["kv"]))
        except ConfigError as e:
            raise SweepError(f"sweep {sweep.get('_path', sweep['name'])}: arm '{r['arm']}' seed {r['seed']}: {e}") from None
        r["max_steps"] = tc.max_steps
        cfg = Path(tc.run_dir) / "config.json"
        if cfg.exists():              # run_dir / progress do not count: committed records carry relative paths
            diff = config_diff(load_json(cfg), {"model": mc.to_dict(), "train": tc.to_dict()}, limit=3)
            if diff:
                raise SweepError(f"sweep {sweep['name']}: arm '{r['arm']}' seed {r['seed']}: {tc.run_dir} holds a run "
                                 f"of a different config ({'; '.join(diff)}); delete it or use another --root")


def is_finished(run_dir, max_steps: int) -> bool:
    """The last step is logged and its checkpoint written; a finished run whose checkpoint was dropped to keep the
    committed records small carries `finished.json` instead (ablations/README.md)."""
    recs = read_metrics(run_dir)
    rd = Path(run_dir)
    return bool(recs) and recs[-1].get("step") == max_steps - 1 and ((rd / "ckpt.pt").exists()
                                                                     or (rd / "finished.json").exists())


def is_diverged(run_dir) -> bool:
    """The run stopped on a non-finite loss (train.py); diverged.json holds the message. A result, not a failure:
    it is not rerun (delete diverged.json to retry) and summarize reports it as diverged = 1."""
    return (Path(run_dir) / "diverged.json").exists()


def is_done(run: dict) -> bool:
    return is_finished(run["kv"]["run_dir"], run["max_steps"]) or is_diverged(run["kv"]["run_dir"])


# --------------------------------------------------------------------------------------------------------------
# executing runs
# --------------------------------------------------------------------------------------------------------------

def device_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def child_env(slot: int, jobs: int, n_gpus: int) -> dict:
    """Environment of the child process in job slot `slot`: one GPU per slot (round robin) where there are GPUs,
    else the CPU cores split evenly over the `jobs` children."""
    env = dict(os.environ)
    if n_gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % n_gpus)
    else:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def execute(run: dict, slot: int, jobs: int, n_gpus: int, log=print) -> int:
    """One papermill execution of notebooks/run.ipynb in a child process; returns its exit code."""
    rd = Path(run["kv"]["run_dir"])
    rd.mkdir(parents=True, exist_ok=True)
    save_json({k: run[k] for k in ("ablation", "scale", "phase", "arm", "family", "seed")} | {"overrides": run["kv"]},
              rd / "sweep.json")
    env = child_env(slot, jobs, n_gpus)
    env.setdefault("MPLBACKEND", "Agg")
    params = {"overrides": run["kv"]}                   # exactly the validated config (plan / validate)
    cmd = [sys.executable, "-m", "papermill", str(RUN_NOTEBOOK), str(rd / "run.ipynb"), "-y", json.dumps(params),
           "-k", "python3", "--cwd", str(ROOT / "notebooks"), "--no-progress-bar", "--log-level", "WARNING"]
    with open(rd / "run.log", "ab") as fh:
        p = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    tail = (rd / "run.log").read_text(errors="replace")[-20000:] if p.returncode else ""
    if p.returncode and "training loss became" in tail:
        msg = next(ln for ln in reversed(tail.splitlines()) if "training loss became" in ln)
        save_json({"message": msg.strip()[:500]}, rd / "diverged.json")
        log(f"[sweep {run['ablation']}] {run['arm']} seed {run['seed']}: diverged (non-finite loss), kept as a result")
        return 0
    if p.returncode:
        log(f"[sweep {run['ablation']}] {run['arm']} seed {run['seed']}: FAILED (exit {p.returncode}), see {rd / 'run.log'}")
    return p.returncode


def run_all(runs: list[dict], jobs: int = 1, stop_at: float | None = None, desc: str = "sweep") -> list[dict]:
    """Run the unfinished ones, `jobs` at a time; no new run starts after time.time() >= stop_at. Returns the
    runs that failed."""
    todo = [r for r in runs if not is_done(r)]
    if not todo:
        return []
    from tqdm.std import tqdm
    n_gpus = device_count()
    failed, lock = [], threading.Lock()
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=desc, unit="run", dynamic_ncols=True)
    free = list(range(jobs))
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        pending: dict = {}
        queue = list(todo)
        while queue or pending:
            while queue and free and (stop_at is None or time.time() < stop_at):
                r, slot = queue.pop(0), free.pop(0)
                pending[ex.submit(execute, r, slot, jobs, n_gpus, bar.write)] = (r, slot)
            if not pending:
                bar.write(f"[{desc}] time limit reached: {len(queue)} runs left for the next call")
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                r, slot = pending.pop(f)
                free.append(slot)
                with lock:
                    if f.result() != 0 or not is_done(r):
                        failed.append(r)
                    bar.update(1)
    bar.close()
    return failed


def choose(sweep: dict, runs: list[dict]) -> dict:
    """Per arm, the tune value with the best mean metric over the selection seeds (finished runs only; a value
    whose runs all diverged is never chosen)."""
    from .metrics import run_metrics
    t, m = sweep["tune"], sweep["metric"]
    sign = 1.0 if m["direction"] == "lower" else -1.0
    chosen = {}
    for arm in sweep["arms"]:
        scores = {}
        for v in t["grid"][arm]:
            vals = [run_metrics(read_metrics(r["kv"]["run_dir"])).get(m["name"]) for r in runs
                    if r["family"] == arm and r["kv"][t["key"]] == v and not is_diverged(r["kv"]["run_dir"])]
            vals = [x for x in vals if x is not None and math.isfinite(x)]
            if vals:
                scores[v] = sum(vals) / len(vals)
        if scores:
            chosen[arm] = min(scores, key=lambda v: sign * scores[v])
    return chosen


def plan(sweep: dict, scale: str, root: str) -> tuple[list[dict], list[dict]]:
    """Selection runs and evaluation runs, all validated (eval runs at every grid value when tuning)."""
    sel = selection_runs(sweep, scale, root)
    ev = eval_runs(sweep, scale, root)
    if "tune" in sweep:                  # every value an eval run may take must be valid too
        t = sweep["tune"]
        ev_all = [r for v_i in range(max(len(g) for g in t["grid"].values()))
                  for r in eval_runs(sweep, scale, root, {a: g[min(v_i, len(g) - 1)] for a, g in t["grid"].items()})]
        validate(sweep, sel + ev_all)
    validate(sweep, sel + ev)
    return sel, ev


def run_sweep_cli(args: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dsv4_lab sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep")
    ap.add_argument("--scale", default="cpu", choices=SCALES)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--root", default="runs")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--stop-after", type=float, default=None, help="start no new run after this many seconds")
    a = ap.parse_args(args)
    if a.jobs < 1:
        raise SweepError(f"--jobs {a.jobs} is not allowed: a positive integer")
    t0 = time.time()
    stop_at = t0 + a.stop_after if a.stop_after is not None else None
    sweep = load_sweep(a.sweep)
    sel, ev = plan(sweep, a.scale, a.root)
    n_done = sum(is_done(r) for r in sel + ev)
    print(f"[sweep {sweep['name']}] scale {a.scale}: {len(sweep['arms'])} arms, {len(sel)} selection + {len(ev)} "
          f"evaluation runs, {n_done} finished, all configs valid; jobs {a.jobs}", flush=True)
    if a.dry_run:
        for r in sel + ev:
            state = "diverged" if is_diverged(r["kv"]["run_dir"]) else "finished" if is_done(r) else "to run"
            print(f"  {r['phase']:>6} {r['arm']:>24} seed {r['seed']:>3}  {r['kv']['run_dir']}  ({state})")
        return 0
    failed = run_all(sel, a.jobs, stop_at, f"{sweep['name']} select") if sel else []
    if sel:
        if failed or not all(is_done(r) for r in sel):
            print(f"[sweep {sweep['name']}] selection incomplete ({len(failed)} failed); evaluation not started",
                  flush=True)
            return 1
        chosen = choose(sweep, sel)
        print(f"[sweep {sweep['name']}] chosen {sweep['tune']['key']} per arm: {chosen}", flush=True)
        ev = eval_runs(sweep, a.scale, a.root, chosen)
        validate(sweep, ev)
    failed += run_all(ev, a.jobs, stop_at, f"{sweep['name']} eval")
    left = sum(not is_done(r) for r in ev)
    print(f"[sweep {sweep['name']}] {len(ev) - left}/{len(ev)} evaluation runs finished, {len(failed)} failed, "
          f"{time.time() - t0:.0f} s", flush=True)
    return 1 if failed or left else 0


def run_sweep(sweep: dict, root: str = "runs", progress: bool = True, scale: str = "cpu") -> list[dict]:
    """In-process runs without papermill (make reproduce's small smoke sweep): train() each run in turn."""
    from .train import train
    sel, ev = plan(sweep, scale, root)
    for r in sel + ev:
        r["kv"]["progress"] = progress
    validate(sweep, sel + ev)
    results = []
    for r in sel + ev:
        mc, tc = parse_overrides(dict(r["kv"]))
        if is_finished(tc.run_dir, tc.max_steps):
            print(f"[sweep {sweep['name']}] {r['arm']} seed {r['seed']}: finished, skipped", flush=True)
        else:
            train(mc, tc)
        recs = read_metrics(tc.run_dir)
        results.append({"arm": r["arm"], "seed": r["seed"], "run_dir": tc.run_dir, "last": recs[-1] if recs else {}})
    return results


def load_sweeps(sweeps_dir) -> dict:
    """{name: sweep} for every sweep file <name>.json in sweeps_dir (reproduce.json excepted)."""
    return {p.stem: load_sweep(p) for p in sorted(Path(sweeps_dir).glob("*.json")) if p.stem != "reproduce"}
