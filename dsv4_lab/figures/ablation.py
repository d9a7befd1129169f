"""figures/ablation_<name>.png from the committed results (ablations/results/*.csv), no retraining.

Left: per arm the mean over seeds of a curve (the primary metric where it is logged at eval steps, else the train
loss) with its 95 % t-band (mean +- t_{0.975, n-1} sd / sqrt(n)). Right: per arm the paired differences to the
baseline on the primary metric (one dot per seed) with the 95 % interval of their mean, and the verdict
(better / worse / null, Holm-corrected; dsv4_lab/stats.py) written beside each arm.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..stats import mean_band, paired_diffs
from . import save_figure


def plot_ablation(sweep: dict, summary: list[dict], curves: list[dict], verdicts: list[dict], out_png,
                  scale: str = "cpu") -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    name, metric = sweep["name"], sweep["metric"]["name"]
    rows = [r for r in summary if r["ablation"] == name and r["scale"] == scale and r["phase"] == "eval"
            and r["metric"] == metric]
    if not rows:
        return None
    arms = [a for a in sweep["arms"] if any(r["arm"] == a for r in rows)]
    cur = [r for r in curves if r["ablation"] == name and r["scale"] == scale]
    curve_metric = metric if any(r["metric"] == metric for r in cur) else "train_loss"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for arm in arms:
        pts: dict = {}
        for r in cur:
            if r["arm"] == arm and r["metric"] == curve_metric and math.isfinite(float(r["value"])):
                pts.setdefault(int(r["step"]), []).append(float(r["value"]))
        steps = sorted(pts)
        if not steps:
            continue
        mb = [mean_band(pts[s]) for s in steps]
        n = max(len(v) for v in pts.values())
        ax1.plot(steps, [m for m, _ in mb], marker="o" if len(steps) < 4 else None, label=f"{arm} (n={n})")
        ax1.fill_between(steps, [m - b for m, b in mb], [m + b for m, b in mb], alpha=0.25)
    ax1.set_xlabel("step")
    ax1.set_ylabel(curve_metric)
    ax1.set_title(f"{name}: mean and 95 % band over seeds ({scale})")
    ax1.legend(fontsize=8)
    base = sweep["baseline"]
    vals = {a: {int(r["seed"]): float(r["value"]) for r in rows if r["arm"] == a} for a in arms}
    others = [a for a in arms if a != base]
    for i, arm in enumerate(others):
        _, d = paired_diffs(vals.get(base, {}), vals[arm])     # no dots while the baseline has no finished run
        ax2.scatter([i] * len(d), d, s=14, color="0.5", zorder=3)
        v = next((v for v in verdicts if v["ablation"] == name and v["scale"] == scale and v["metric"] == metric
                  and v["arm"] == arm), None)
        if v is None:
            continue
        m, lo, hi = float(v["mean_diff"]), float(v["ci_low"]), float(v["ci_high"])
        color = {"better": "tab:green", "worse": "tab:red"}.get(v["verdict"], "tab:blue")
        ax2.errorbar([i + 0.15], [m], yerr=[[m - lo], [hi - m]], fmt="o", color=color, capsize=4, zorder=4)
        ax2.annotate(f"{v['verdict']}\nn={v['n_seeds']}, p_holm={float(v['p_holm']):.2g}", (i + 0.2, m),
                     fontsize=8, color=color, xytext=(6, 0), textcoords="offset points", va="center")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(others)), [f"{a}\n- {base}" for a in others])
    ax2.set_xlim(-0.5, len(others) - 0.2)
    d = sweep["metric"]["direction"]
    ax2.set_ylabel(f"paired difference in {metric} ({d} is better)")
    title = f"{sweep['budget_type']}; dots = seeds, bar = 95 % CI of the mean"
    if base in vals:
        ax2.set_title(title)
    else:
        ax2.set_title(f"{title}\n(baseline '{base}' has no finished run yet: nothing to pair)", fontsize=9)
    fig.suptitle(sweep.get("question", ""), fontsize=9, wrap=True)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=110)


def plot_all(results_dir="ablations/results", out_dir="figures", sweeps_dir="ablations",
             scales: tuple[str, ...] = ("cpu", "gpu")) -> list[Path]:
    """One figure per ablation and tier that has results (ablation_<name>.png for the CPU tier,
    ablation_<name>_gpu.png for the GPU tier); ablations without results are skipped (no empty figure)."""
    from ..runlog import read_csv
    from ..sweep import load_sweeps
    res = Path(results_dir)
    summary, curves, ver = (read_csv(res / f) for f in ("summary.csv", "curves.csv", "verdicts.csv"))
    made = []
    for name, sw in load_sweeps(sweeps_dir).items():
        for scale in scales if "metric" in sw else ():
            png = Path(out_dir) / (f"ablation_{name}.png" if scale == "cpu" else f"ablation_{name}_{scale}.png")
            p = plot_ablation(sw, summary, curves, ver, png, scale)
            if p is not None:
                made.append(p)
    return made
