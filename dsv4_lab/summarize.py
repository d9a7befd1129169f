"""Results as data: run records -> ablations/results/{summary,curves,verdicts}.csv, and the verdict table.

    python -m dsv4_lab summarize [runs_root ...] [--out ablations/results] [--sweeps ablations] [--figures DIR]

summary.csv (long): ablation, arm, seed, scale, phase, steps, tokens, flops, device, metric, value: one row per
    finished run and scalar metric (dsv4_lab/metrics.run_metrics; phase "select" = tuning runs), plus the
    cross-run spikes_shared_with_baseline / spikes_shared_across_seeds rows (spike_sharing below).
curves.csv (long): ablation, arm, seed, scale, step, tokens, metric, value: train_loss (mean of the per-step losses
    since the previous record) and the validation metrics at each record, for the figures' mean + band.
verdicts.csv: ablation, scale, metric, primary, arm, baseline, n_seeds, mean_diff, ci_low, ci_high, p, p_holm,
    verdict, budget_type, method, direction: each non-baseline arm against the sweep's baseline on the sweep's
    metric and its secondary metrics, paired over seeds, Holm across the arms (dsv4_lab/stats.py).
Only finished runs count, and runs that diverged (diverged.json: stopped on a non-finite loss), which give
diverged = 1 and their stability metrics only; their seed then drops out of the loss comparisons. The three files are written together, atomically, after all are built. Figures are
written only with --figures DIR (or by `make reproduce`, which regenerates them from the committed CSVs).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .config import ConfigError
from .metrics import run_metrics, shared_spikes, spike_starts, step_losses
from .runlog import atomic_write_bytes, load_json, read_csv, read_metrics
from .stats import compare_arms
from .sweep import load_sweeps

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_COLS = ["ablation", "arm", "seed", "scale", "phase", "steps", "tokens", "flops", "device", "metric", "value"]
CURVE_COLS = ["ablation", "arm", "seed", "scale", "step", "tokens", "metric", "value"]
DIVERGED_KEEP = ("spike_count", "largest_jump", "max_grad_norm", "hc_composite_gain_max")
VERDICT_COLS = ["ablation", "scale", "metric", "primary", "arm", "baseline", "n_seeds", "mean_diff", "ci_low",
                "ci_high", "p", "p_holm", "verdict", "budget_type", "method", "direction"]


def _device(rd: Path) -> str:
    """The GPU's name for a run trained on CUDA, else `cpu x<threads>`."""
    env = load_json(rd / "env.json") if (rd / "env.json").exists() else {}
    if str(env.get("device", "cuda")).startswith("cuda") and env.get("gpu"):
        return env["gpu"]
    return f"cpu x{env.get('torch_threads', '?')}"


def collect(roots, baselines: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(summary rows, curve rows) of every finished sweep run under the roots; with baselines ({ablation: baseline
    arm}) also the cross-run spike rows of `spike_sharing`."""
    summary, curves, starts = [], [], {}
    for root in roots:
        for sj in sorted(Path(root).rglob("sweep.json")):
            rd = sj.parent
            info, recs = load_json(sj), read_metrics(rd)
            if not (rd / "config.json").exists() or not recs:
                continue
            steps = load_json(rd / "config.json")["train"]["max_steps"]
            diverged = (rd / "diverged.json").exists()
            if recs[-1].get("step") != steps - 1 and not diverged:
                continue                                            # unfinished: not a result
            last = recs[-1]
            key = {"ablation": info["ablation"], "arm": info["arm"], "seed": info["seed"], "scale": info["scale"]}
            common = {**key, "phase": info["phase"], "steps": steps, "tokens": last.get("tokens"),
                      "flops": last.get("flops"), "device": _device(rd)}
            ms = run_metrics(recs)
            if diverged:          # stopped on a non-finite loss: only whole-run stability metrics are meaningful
                ms = {k: v for k, v in ms.items() if k in DIVERGED_KEEP} | {"diverged": 1.0}
            for m, v in sorted(ms.items()):
                summary.append({**common, "metric": m, "value": v})
            if info["phase"] != "eval" or diverged:
                continue
            run = (key["ablation"], key["scale"], key["arm"], int(key["seed"]))
            starts[run] = (common, spike_starts(step_losses(recs)))
            for r in recs:
                ls = r.get("losses") or []
                pts = {"train_loss": sum(ls) / len(ls) if ls else r.get("train_loss")}
                pts.update({k: v for k, v in r.items() if k.startswith("val_") and isinstance(v, (int, float))})
                for m, v in pts.items():
                    if v is not None:
                        curves.append({**key, "step": r["step"], "tokens": r.get("tokens"), "metric": m, "value": v})
    return summary + spike_sharing(starts, baselines or {}), curves


def spike_sharing(starts: dict, baselines: dict) -> list[dict]:
    """Are the spikes the arm's or the data's? Per evaluation run of a non-baseline arm: `spikes_shared_with_baseline`
    = the fraction of its spike events that start within a step of one of the baseline arm's events on the same seed
    (the same batches in the same order); per baseline run, the control `spikes_shared_across_seeds` = the same
    fraction against the baseline's next seed (other batches). dsv4_lab/metrics.shared_spikes."""
    rows = []
    for (name, scale, arm, seed), (common, mine) in sorted(starts.items(), key=lambda kv: kv[0]):
        base = baselines.get(name)
        if base is None:
            continue
        if arm != base:
            other = starts.get((name, scale, base, seed))
            metric = "spikes_shared_with_baseline"
        else:
            seeds = sorted(s for (n, sc, a, s) in starts if (n, sc, a) == (name, scale, base))
            nxt = seeds[(seeds.index(seed) + 1) % len(seeds)]
            other = starts.get((name, scale, base, nxt)) if nxt != seed else None
            metric = "spikes_shared_across_seeds"
        v = shared_spikes(mine, other[1]) if other else None
        if v is not None:
            rows.append({**common, "metric": metric, "value": v})
    return rows


def verdicts(summary: list[dict], sweeps: dict) -> list[dict]:
    out = []
    for name, sw in sweeps.items():
        if "metric" not in sw:
            continue
        rows = [r for r in summary if r["ablation"] == name and r["phase"] == "eval"]
        for scale in sorted({r["scale"] for r in rows}):
            for i, m in enumerate([sw["metric"]] + sw.get("secondary", [])):
                if scale not in m.get("scales", [scale]):      # not comparable at this scale (the metric's `why`)
                    continue
                values: dict = {}
                for r in rows:
                    if r["scale"] == scale and r["metric"] == m["name"] and math.isfinite(float(r["value"])):
                        values.setdefault(r["arm"], {})[int(r["seed"])] = float(r["value"])
                if sw["baseline"] not in values or len(values) < 2:
                    continue
                for v in compare_arms(values, sw["baseline"], m["direction"] == "lower", m.get("method", "t")):
                    out.append({"ablation": name, "scale": scale, "metric": m["name"], "primary": i == 0,
                                **{k: v[k] for k in ("arm", "baseline", "n_seeds", "mean_diff", "ci_low", "ci_high",
                                                     "p", "p_holm", "verdict")},
                                "budget_type": sw["budget_type"], "method": m.get("method", "t"),
                                "direction": m["direction"]})
    return out


def _csv(rows: list[dict], cols: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue().encode()


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no verdicts: no ablation has finished runs of its baseline and another arm)"
    lines = [f"{'ablation':<16}{'scale':<6}{'metric':<24}{'arm':<20}{'n':>3} {'mean diff':>10} {'95% CI':>22} "
             f"{'p_holm':>7}  verdict"]
    for r in rows:
        f = lambda k: float(r[k])  # noqa: E731
        ci = f"[{f('ci_low'):+.4g}, {f('ci_high'):+.4g}]"
        lines.append(f"{r['ablation']:<16}{r['scale']:<6}{r['metric'][:23]:<24}{(r['arm'] + ' vs ' + r['baseline'])[:19]:<20}"
                     f"{int(r['n_seeds']):>3} {f('mean_diff'):>+10.4g} {ci:>22} {f('p_holm'):>7.3g}  {r['verdict']}"
                     + ("" if str(r["primary"]) == "True" else " (secondary)"))
    return "\n".join(lines)


def summarize(roots, out="ablations/results", sweeps_dir=None) -> list[dict]:
    sweeps = load_sweeps(sweeps_dir or ROOT / "ablations")
    summary, curves = collect(roots, {n: sw["baseline"] for n, sw in sweeps.items() if "baseline" in sw})
    ver = verdicts(summary, sweeps)
    blobs = {"summary.csv": _csv(summary, SUMMARY_COLS), "curves.csv": _csv(curves, CURVE_COLS),
             "verdicts.csv": _csv(ver, VERDICT_COLS)}
    for name, data in blobs.items():
        atomic_write_bytes(Path(out) / name, data)
    return ver


def summarize_cli(args: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dsv4_lab summarize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="*", default=["runs"])
    ap.add_argument("--out", default=str(ROOT / "ablations" / "results"))
    ap.add_argument("--sweeps", default=str(ROOT / "ablations"))
    ap.add_argument("--figures", default=None, help="also write figures/ablation_<name>.png into this folder")
    a = ap.parse_args(args)
    for r in a.roots:
        if not Path(r).is_dir():
            raise ConfigError(f"summarize: runs root {r!r} is not a directory")
    ver = summarize(a.roots, a.out, a.sweeps)
    n = len(read_csv(Path(a.out) / "summary.csv"))
    print(f"[summarize] {n} summary rows, {len(ver)} verdict rows -> {a.out}")
    print(format_table(ver))
    if a.figures:
        from .figures.ablation import plot_all
        for p in plot_all(a.out, a.figures, a.sweeps):
            print(f"[summarize] figure {p}")
    return 0
