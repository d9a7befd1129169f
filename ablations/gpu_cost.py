"""What the GPU tier costs, from measurements (ablations/run_gpu_tier.sh calls this; no GPU needed).

Per arm, the ms per step of one run alone on the H200 (benchmarks/results/cuda_graph.json: graphed where the sweep's
gpu setting has cuda_graph=true, eager otherwise; an arm not measured takes its sweep's mean over measured arms; a
sweep none of whose arms was measured may name in `cost_like` a measured sweep with the same arms to borrow from),
STARTUP_S of start-up per run (papermill, imports, model build) and the measured packing gain (several runs per
GPU: aggregate throughput against one run alone).

    python ablations/gpu_cost.py estimate SWEEP...        # device minutes left (runs with records are done)
    python ablations/gpu_cost.py wave JOBS SWEEP...        # per sweep: seconds one run takes when JOBS share the GPU
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4_lab.config import parse_overrides  # noqa: E402
from dsv4_lab.sweep import load_sweep, plan  # noqa: E402

MEASURED = ROOT / "benchmarks" / "results" / "cuda_graph.json"
STARTUP_S = float(os.environ.get("STARTUP_S", 30))


def measured() -> tuple[dict, float, str]:
    """({(sweep, arm): (eager ms, graph ms)}, packing gain, commit) from the benchmark's JSON."""
    m = json.loads(MEASURED.read_text())
    ms = {(r["sweep"], r["arm"]): (r["eager_ms_per_step"], r["graph_ms_per_step"]) for r in m["rows"] if "speedup" in r}
    gain = max([1.0] + [ms[(p["sweep"], p["arm"])][1] / p["aggregate_ms_per_step"] for p in m["pack"]
                        if "aggregate_ms_per_step" in p and (p["sweep"], p["arm"]) in ms])
    return ms, gain, m["env"].get("git", "?")


def runs(name: str, sweep_dir: str) -> tuple[list[tuple[dict, float]], bool, dict]:
    """[(run, seconds alone)] of every selection and evaluation run of a sweep at scale gpu, whether it graphs, and
    {arm: measured ms per step} (of the `cost_like` sweep where the file names one)."""
    ms, _, _ = measured()
    sw = load_sweep(Path(sweep_dir) / f"{name}.json")
    sel, ev = plan(sw, "gpu", "runs")
    graph = parse_overrides(dict(ev[0]["kv"]))[1].cuda_graph
    like = sw.get("cost_like", name)
    arm_ms = {a: v[1 if graph else 0] for (s, a), v in ms.items() if s == like}
    mean = sum(arm_ms.values()) / len(arm_ms) if arm_ms else float("nan")
    out = []
    for r in sel + ev:
        tc = parse_overrides(dict(r["kv"]))[1]
        arm = r["arm"].split("-")[0] if r.get("phase") == "select" else r["arm"]
        out.append((r, STARTUP_S + tc.max_steps * arm_ms.get(arm, mean) / 1e3))
    return out, graph, arm_ms


def done(run: dict, records: Path) -> bool:
    rel = Path(run["kv"]["run_dir"]).resolve().relative_to(Path("runs").resolve())
    return (records / rel / "finished.json").exists()


def estimate(names, sweep_dir: str, records: Path) -> None:
    _, gain, commit = measured()
    print(f"measured: benchmarks/results/cuda_graph.json (commit {commit[:7]}); packing gain {gain:.1f}x; "
          f"start-up {STARTUP_S:.0f} s per run")
    print(f"{'sweep':<15}{'runs':>5}{'done':>5}{'steps':>7}{'mode':>7}{'ms/step alone':>15}{'s/run alone':>13}"
          f"{'device-min left':>17}")
    total = 0.0
    for name in names:
        rs, graph, arm_ms = runs(name, sweep_dir)
        arm_ms = list(arm_ms.values())
        n_done = sum(done(r, records) for r, _ in rs)
        left = sum(s for r, s in rs if not done(r, records)) / gain / 60
        total += left
        steps = sorted({parse_overrides(dict(r["kv"]))[1].max_steps for r, _ in rs if r.get("phase") != "select"})
        lo, hi = (min(arm_ms), max(arm_ms)) if arm_ms else (float("nan"),) * 2
        sec = [s for _, s in rs]
        print(f"{name:<15}{len(rs):>5}{n_done:>5}{'/'.join(map(str, steps)):>7}{'graph' if graph else 'eager':>7}"
              f"{f'{lo:.0f}-{hi:.0f}':>15}{f'{min(sec):.0f}-{max(sec):.0f}':>13}{left:>17.1f}")
    print(f"{'total':<15}{'':>52}{total:>17.0f}")


def wave(jobs: int, names, sweep_dir: str) -> None:
    """One line per sweep: `name seconds`, the longest run of the sweep slowed by sharing the GPU with jobs - 1
    others (each process runs at gain / jobs of its speed alone once jobs exceed the gain)."""
    _, gain, _ = measured()
    slow = max(1.0, jobs / gain)
    for name in names:
        rs, _, _ = runs(name, sweep_dir)
        longest = max(s for _, s in rs)
        if longest == longest:                       # nan: no arm of this sweep measured, no line
            print(name, int(longest * slow) + 1)


def main(argv) -> int:
    wave_bad = argv[:1] == ["wave"] and (len(argv) < 2 or not argv[1].isdigit() or int(argv[1]) < 1)
    if not argv or argv[0] not in ("estimate", "wave") or wave_bad:
        print("usage: gpu_cost.py estimate SWEEP... | wave JOBS SWEEP... (JOBS a positive integer)", file=sys.stderr)
        return 2
    if not MEASURED.exists():
        print(f"gpu_cost.py: {MEASURED.relative_to(ROOT)} is missing: run benchmarks/bench_cuda_graph.py on a GPU first",
              file=sys.stderr)
        return 2
    sweep_dir = os.environ.get("SWEEP_DIR", str(ROOT / "ablations"))
    if argv[0] == "estimate":
        estimate(argv[1:], sweep_dir, Path(os.environ.get("RECORDS", ROOT / "ablations" / "records")))
    else:
        wave(int(argv[1]), argv[2:], sweep_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
