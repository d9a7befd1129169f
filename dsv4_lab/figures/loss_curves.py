"""Loss curves of a set of runs, read from their metrics.jsonl (train loss and validation loss vs step and vs
training FLOPs). Writes a PNG, the CSV it was drawn from, and `<name>.runs.json` with each run's config.json
and env.json (git commit, versions, device), so a committed figure carries the records that made it."""
from __future__ import annotations

from pathlib import Path

from ..runlog import load_json, read_metrics, repo_relative, save_json


def collect(run_dirs) -> list[dict]:
    rows = []
    for rd in run_dirs:
        rd = Path(rd)
        cfg = load_json(rd / "config.json") if (rd / "config.json").exists() else {}
        for r in read_metrics(rd):
            rows.append({"run": rd.name, "group": rd.parent.name, "step": r["step"], "tokens": r.get("tokens"),
                         "flops": r.get("flops"), "train_loss": r.get("train_loss"), "lm_loss": r.get("lm_loss"),
                         "val_loss": r.get("val_loss"), "val_answer_acc": r.get("val_answer_acc"),
                         "seed": cfg.get("train", {}).get("seed")})
    return rows


def plot_loss_curves(run_dirs, out_png, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = collect(run_dirs)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out_png.with_suffix(".csv"), index=False)
    records = {}
    for rd in map(Path, run_dirs):
        records[rd.name] = repo_relative({f: load_json(rd / f"{f}.json") for f in ("config", "env")
                                           if (rd / f"{f}.json").exists()})
    save_json(records, out_png.with_suffix(".runs.json"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run, g in df.groupby("run", sort=True) if len(df) else []:
        g = g.sort_values("step")
        l, = axes[0].plot(g["step"], g["lm_loss"], alpha=0.5, label=f"{run} train")
        v = g.dropna(subset=["val_loss"])
        axes[0].plot(v["step"], v["val_loss"], "o-", color=l.get_color(), label=f"{run} val")
        axes[1].plot(g["flops"], g["lm_loss"], alpha=0.5, color=l.get_color(), label=run)
    axes[0].set(xlabel="step", ylabel="loss (nats/byte)", title=title or "loss vs step (equal tokens)")
    axes[1].set(xlabel="training FLOPs", ylabel="train loss", xscale="log", title="loss vs compute")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
