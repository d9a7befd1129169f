"""Sweeps: arms x seeds under one budget, each run in its own run_dir; finished runs are skipped and
interrupted ones resume (train.py), so a killed sweep restarted with the same command loses nothing.

A sweep definition (ablations/*.json) is
    {"name": "...", "base": {key: value, ...}, "arms": {"arm": {key: value}, ...}, "seeds": [0, 1, 2],
     "question": "...", "budget": "equal tokens"}
Each run is `base + arm + seed` with run_dir = <root>/<name>/<arm>-s<seed>.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import parse_overrides
from .runlog import read_metrics


def load_sweep(path) -> dict:
    d = json.loads(Path(path).read_text())
    for k in ("name", "arms"):
        if k not in d:
            raise ValueError(f"sweep {path}: missing field '{k}' (need name, arms; optional base, seeds)")
    return d


def sweep_runs(sweep: dict, root: str = "runs") -> list[tuple[str, int, dict]]:
    out = []
    for arm, over in sweep["arms"].items():
        for seed in sweep.get("seeds", [0]):
            kv = {**sweep.get("base", {}), **over, "seed": seed,
                  "run_dir": str(Path(root) / sweep["name"] / f"{arm}-s{seed}")}
            out.append((arm, seed, kv))
    return out


def is_finished(run_dir, max_steps: int) -> bool:
    recs = read_metrics(run_dir)
    return bool(recs) and recs[-1].get("step") == max_steps - 1 and (Path(run_dir) / "ckpt.pt").exists()


def run_sweep(sweep: dict, root: str = "runs", progress: bool = True) -> list[dict]:
    from .train import train
    results = []
    for arm, seed, kv in sweep_runs(sweep, root):
        mc, tc = parse_overrides({k: v for k, v in kv.items()})
        tc.progress = progress
        if is_finished(tc.run_dir, tc.max_steps):
            print(f"[sweep {sweep['name']}] {arm} seed {seed}: finished, skipped", flush=True)
        else:
            train(mc, tc)
        recs = read_metrics(tc.run_dir)
        results.append({"arm": arm, "seed": seed, "run_dir": tc.run_dir, "last": recs[-1] if recs else {}})
    return results
