"""CUDA-graph training steps (dsv4_lab/cuda_graph.py, docs/kernels.md §10) at each GPU ablation's setting: how
much faster than eager, and whether the numbers are the same.

For each arm of each sweep's `scales.gpu` config (seed 0; `--arms` keeps some), two short runs of the same config
through `dsv4_lab.train.train`: eager, then cuda_graph=true.
Reports ms per step (wall time between the records of steps --skip and --steps-1: the graph is recorded at step 3),
whether the per-step losses and the final weights are bitwise equal, and the largest loss difference; for the
--repeat-eager configs also that difference between two eager runs (the Triton backward kernels add gradients with
fp32 atomics, so eager runs differ from each other in the last bits, and chaotic settings amplify that).

    PYTHONPATH=$PWD python3 benchmarks/bench_cuda_graph.py --steps 60 --commit <sha> \\
        --out benchmarks/results/cuda_graph.json          # on the GPU; ~2 minutes

`--pack N` also starts N graphed runs of the first config at once (separate processes, as a packed sweep does) and
reports their ms per step: whether packing graphed runs onto one GPU gains throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4_lab.config import parse_overrides  # noqa: E402
from dsv4_lab.runlog import environment, load_checkpoint, read_metrics, save_json  # noqa: E402
from dsv4_lab.sweep import eval_runs, load_sweep  # noqa: E402
from dsv4_lab.train import train  # noqa: E402

SWEEPS = ("csa_vs_hca", "mhc_vs_hc", "muon_vs_adamw", "fp4_vs_fp8", "anticipatory")


def configs(names, arms=None) -> list[tuple[str, str, dict]]:
    out = []
    for name in names:
        sw = load_sweep(ROOT / "ablations" / f"{name}.json")
        for r in eval_runs(sw, "gpu", "unused"):
            if r["seed"] != 0 or (arms and f"{name}/{r['arm']}" not in arms):
                continue
            kv = {k: v for k, v in r["kv"].items() if k not in ("run_dir", "cuda_graph")}
            out.append((name, r["arm"], kv))
    return out


def short(kv: dict, steps: int, run_dir: Path, graph: bool) -> dict:
    return {**kv, "max_steps": steps, "log_interval": 1, "eval_interval": steps, "eval_batches": 1,
            "ckpt_interval": steps, "warmup_steps": min(int(kv.get("warmup_steps", 10)), steps // 2),
            "run_dir": str(run_dir), "progress": False, "cuda_graph": graph, "compile": "false"}


def ms_per_step(recs: list[dict], skip: int) -> float:
    a = next(r for r in recs if r["step"] == skip)
    b = recs[-1]
    return 1e3 * (b["time_s"] - a["time_s"]) / (b["step"] - a["step"])


def one(name: str, arm: str, kv: dict, steps: int, skip: int, tmp: Path, repeat: bool) -> dict:
    rows = {}
    for mode in ("eager", "graph", "eager2")[:3 if repeat else 2]:
        graph = mode == "graph"
        rd = tmp / f"{name}-{arm}-{mode}"
        mc, tc = parse_overrides(short(kv, steps, rd, graph))
        t0 = time.time()
        train(mc, tc)
        torch.cuda.synchronize()
        recs = read_metrics(rd)
        rows[mode] = {"wall_s": time.time() - t0, "ms_per_step": ms_per_step(recs, skip),
                       "losses": [r["train_loss"] for r in recs], "val_loss": recs[-1].get("val_loss"),
                       "replays": recs[-1].get("cuda_graph_replays"),
                       "weights": load_checkpoint(rd / "ckpt.pt")["model"]}
    e, g = rows["eager"], rows["graph"]
    same_w = all(torch.equal(e["weights"][k], g["weights"][k]) for k in e["weights"])
    diff = max(abs(a - b) for a, b in zip(e["losses"], g["losses"]))
    noise = {}
    if "eager2" in rows:                               # the spread of two eager runs: Triton atomics, flash bwd
        e2 = rows["eager2"]
        noise = {"max_abs_loss_diff_eager_vs_eager": max(abs(a - b) for a, b in zip(e["losses"], e2["losses"])),
                 "eager_vs_eager_bitwise_equal": e["losses"] == e2["losses"]}
    return {"sweep": name, "arm": arm, "overrides": {k: v for k, v in kv.items() if k != "seed"},
            "eager_ms_per_step": round(e["ms_per_step"], 3), "graph_ms_per_step": round(g["ms_per_step"], 3),
            "speedup": round(e["ms_per_step"] / g["ms_per_step"], 3), "graph_replays": g["replays"],
            "losses_bitwise_equal": e["losses"] == g["losses"], "weights_bitwise_equal": same_w,
            "max_abs_loss_diff": diff, **noise, "val_loss_eager": e["val_loss"], "val_loss_graph": g["val_loss"],
            "eager_wall_s": round(e["wall_s"], 1), "graph_wall_s": round(g["wall_s"], 1)}


def pack(name: str, arm: str, kv: dict, n: int, steps: int, skip: int, tmp: Path) -> dict:
    procs, dirs = [], []
    for i in range(n):
        rd = tmp / f"pack{n}-{i}"
        args = [f"{k}={v}" for k, v in short({**kv, "seed": i}, steps, rd, True).items()]
        procs.append(subprocess.Popen([sys.executable, "-m", "dsv4_lab", "train", *args], cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        dirs.append(rd)
    errs = [p.communicate()[1] for p in procs]
    bad = [e.strip().splitlines()[-1] for p, e in zip(procs, errs) if p.returncode]
    if bad:
        return {"sweep": name, "arm": arm, "processes": n, "failed": bad[:2]}
    ms = [ms_per_step(read_metrics(d), skip) for d in dirs]
    return {"sweep": name, "arm": arm, "processes": n, "ms_per_step_each": [round(m, 2) for m in ms],
            "aggregate_ms_per_step": round(max(ms) / n, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=15, help="first step of the timed span")
    ap.add_argument("--sweeps", nargs="*", default=list(SWEEPS))
    ap.add_argument("--arms", nargs="*", default=None, help="sweep/arm configs to measure (default: every arm)")
    ap.add_argument("--repeat-eager", nargs="*", default=["csa_vs_hca/csa", "mhc_vs_hc/hc", "fp4_vs_fp8/none"],
                    help="sweep/arm configs that also get a second eager run (the eager-vs-eager spread)")
    ap.add_argument("--pack", type=int, nargs="*", default=[], help="process counts for the packing test")
    ap.add_argument("--pack-config", default="csa_vs_hca/csa", help="sweep/arm of the packing test")
    ap.add_argument("--pack-steps", type=int, default=200)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default="benchmarks/results/cuda_graph.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_graph: needs a CUDA GPU", file=sys.stderr)
        return 2
    if not 0 <= a.skip < a.steps - 1:
        print(f"bench_cuda_graph: --skip {a.skip} is not allowed: an integer in [0, --steps - 1)", file=sys.stderr)
        return 2
    env = environment("cuda")
    if a.commit:
        env["git"] = a.commit
    out = {"what": "eager vs cuda_graph=true training steps at the GPU ablations' settings (seed 0)",
           "env": env, "steps": a.steps, "timed_steps": [a.skip, a.steps - 1], "rows": [], "pack": []}
    cfgs = configs(a.sweeps, a.arms)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, arm, kv in cfgs:
            try:
                row = one(name, arm, kv, a.steps, a.skip, tmp, f"{name}/{arm}" in a.repeat_eager)
            except Exception as e:                     # a config whose capture fails is a finding, not a crash
                row = {"sweep": name, "arm": arm, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            out["rows"].append(row)
            save_json(out, Path(a.out))                # after every row: a call cut short keeps what it measured
            print(json.dumps({k: v for k, v in row.items() if k != "overrides"}), flush=True)
        for n in a.pack:
            name, arm, kv = next(c for c in cfgs if f"{c[0]}/{c[1]}" == a.pack_config)
            res = pack(name, arm, kv, n, a.pack_steps, a.skip, tmp)
            out["pack"].append(res)
            save_json(out, Path(a.out))
            print(json.dumps(res), flush=True)
    save_json(out, Path(a.out))
    print(f"bench_cuda_graph: {len(out['rows'])} configs -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
