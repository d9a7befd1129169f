"""figures/long_context_quality.png from the committed results JSON (dsv4_lab/longctx.py), no training.

Left: answer token accuracy vs context length (log2 x), per arm the mean over seeds (thick) with its 95 % t-band
(mean +- t_{0.975, n-1} sd / sqrt(n)) and every seed (thin); dotted lines: the window, the training length, chance
(1/64). Right: the same for the answers whose needle lies farther back than the window (what a window-only model
cannot see directly). The claim boundary is written under the title.
"""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..stats import mean_band
from . import read_results

COLORS = {"v4": "tab:blue", "dense": "tab:orange", "swa": "tab:green"}
REC_KEYS = ("setting", "arm", "seed", "lengths")


def load_results(path) -> dict:
    """The results JSON, checked; ConfigError naming the file and the field otherwise."""
    path = Path(path)
    d = read_results(path, "long-context results", "python -m dsv4_lab longctx run / collect")
    if not isinstance(d, dict) or not isinstance(d.get("records"), list) or not isinstance(d.get("settings"), dict):
        raise ConfigError(f"long-context results {path}: need an object with 'records' (list) and 'settings' (object)")
    for i, r in enumerate(d["records"]):
        miss = [k for k in REC_KEYS if k not in r]
        if miss:
            raise ConfigError(f"long-context results {path}: records[{i}] lacks field '{miss[0]}' (need {REC_KEYS})")
        if r["setting"] not in d["settings"]:
            raise ConfigError(f"long-context results {path}: records[{i}].setting = {r['setting']!r} is not in "
                              f"'settings' {sorted(d['settings'])}")
        for n, v in r["lengths"].items():
            if not (str(n).isdigit() and isinstance(v, dict) and isinstance(v.get("answer_acc"), (int, float))):
                raise ConfigError(f"long-context results {path}: records[{i}].lengths[{n!r}] needs a positive "
                                  "integer length and a number 'answer_acc'")
    return d


def per_seed(d: dict, setting: str, metric: str = "answer_acc") -> dict:
    """{arm: {seed: [(length, value), ...]}} of one setting (lengths where the metric is defined)."""
    out: dict = {}
    for r in d["records"]:
        if r["setting"] != setting:
            continue
        pts = sorted((int(n), float(v[metric])) for n, v in r["lengths"].items() if v.get(metric) is not None)
        out.setdefault(r["arm"], {})[r["seed"]] = pts
    return out


def curves(d: dict, setting: str, metric: str = "answer_acc") -> dict:
    """{arm: [(length, mean, half-width of the 95 % band, n_seeds), ...]} over the seeds of one setting."""
    per: dict = {}
    for arm, seeds in per_seed(d, setting, metric).items():
        for pts in seeds.values():
            for n, v in pts:
                per.setdefault(arm, {}).setdefault(n, []).append(v)
    return {arm: [(n, *mean_band(vals), len(vals)) for n, vals in sorted(pts.items())] for arm, pts in per.items()}


def claim_boundary(meta: dict) -> str:
    q = meta.get("task_mrcr_queries", 1)
    return (f"4-layer tiny-width byte models, synthetic MRCR (3 types x {meta['task_n_needles']} needles of 4 tokens, "
            f"{q} {'query' if q == 1 else 'queries'} per sequence), trained at {meta['train_seq_len']} tokens for "
            f"{meta['max_steps']} steps, window {meta['window']}; "
            "beyond the training length = position extrapolation; says nothing about natural text or real model sizes")


def plot_long_context(results, out_png, setting: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    d = load_results(results)
    if not d["records"]:
        raise ConfigError(f"long-context results {results}: 'records' is empty, nothing to plot")
    setting = setting or max(d["settings"], key=lambda s: sum(r["setting"] == s for r in d["records"]))
    meta = d["settings"][setting]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, metric, label in ((axes[0], "answer_acc", "answer token accuracy"),
                              (axes[1], "answer_acc_far", "answer accuracy, needle beyond the window")):
        seeds = per_seed(d, setting, metric)
        for arm, pts in sorted(curves(d, setting, metric).items()):
            xs = [p[0] for p in pts]
            m = [p[1] for p in pts]
            b = [p[2] for p in pts]
            n = max(p[3] for p in pts)
            types = meta["arms"].get(arm, "")
            types = ",".join(types) if isinstance(types, list) else str(types)
            ax.plot(xs, m, marker="o", color=COLORS.get(arm), label=f"{arm} ({types}; n={n} seeds)")
            ax.fill_between(xs, [a - c for a, c in zip(m, b)], [a + c for a, c in zip(m, b)], alpha=0.2,
                            color=COLORS.get(arm))
            for sp in seeds[arm].values():                              # every seed, thin
                ax.plot([p[0] for p in sp], [p[1] for p in sp], color=COLORS.get(arm), lw=0.7, alpha=0.6)
        ax.axvline(meta["window"], color="0.4", ls=":", lw=1)
        ax.axvline(meta["train_seq_len"], color="k", ls="--", lw=1)
        ax.text(meta["window"], 1.02, " window", fontsize=8, transform=ax.get_xaxis_transform())
        ax.text(meta["train_seq_len"], 1.02, " training length", fontsize=8, transform=ax.get_xaxis_transform())
        if metric.startswith("answer_acc"):
            ax.axhline(d.get("chance_answer_acc", 1 / 64), color="0.6", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("all answers: mean, 95 % band over seeds, each seed thin", fontsize=9, pad=14)
    axes[1].set_title(f"setting '{setting}', {meta['eval_seqs']} sequences per length", fontsize=9, pad=14)
    import textwrap
    fig.suptitle("Long-context quality vs context length (MRCR-like retrieval)\n"
                 + "\n".join(textwrap.wrap(claim_boundary(meta), 150)), fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_committed(results, out_dir) -> list[Path]:
    """`make reproduce`: figures/long_context_quality.png from the committed results JSON; one line and nothing
    drawn when it is absent (the GPU command that makes it: ablations/README.md, long-context quality)."""
    if not Path(results).exists():
        print(f"[figures] long-context quality: {results} not committed yet, figure not drawn")
        return []
    return [plot_long_context(results, Path(out_dir) / "long_context_quality.png")]
