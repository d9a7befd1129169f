"""figures/indexer_recall.png: how much of the exact indexer top-k a selector keeps when the index scores are stored in
less precision (fp32, bf16, fp16, fp8 E4M3), against the number of visible compressed entries; drawn from the
committed benchmarks/results/indexer_recall.json (benchmarks/bench_indexer_recall.py, CPU), no measurement here.

    from dsv4_lab.figures.indexer_recall import plot_committed
    plot_committed("benchmarks/results/indexer_recall.json", "figures")   # [] and one line when the JSON is absent

One panel per index shape (preset): the share of the exact top-k missed (100 - recall, log scale) per precision, mean
over the query rows (markers) and the worst row (dashed), and the paper's 0.3 % for BF16 scores (dotted); a
precision that misses nothing anywhere (fp32 here) is named in the title. The claim boundary (random q, k, w) is
written under the title.
"""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from . import read_results, save_figure

COLORS = {"fp32": "tab:gray", "bf16": "tab:blue", "fp16": "tab:green", "fp8_e4m3": "tab:red"}
ROW_KEYS = ("preset", "S", "k", "precision", "recall_mean", "recall_min")
PAPER_BF16 = 0.997


def load(path) -> dict:
    """The results JSON, checked; ConfigError naming the file and the field otherwise."""
    path = Path(path)
    d = read_results(path, "indexer recall results", "benchmarks/bench_indexer_recall.py")
    if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or not d["rows"]:
        raise ConfigError(f"indexer recall results {path}: need an object with a non-empty 'rows' list")
    for i, r in enumerate(d["rows"]):
        miss = [k for k in ROW_KEYS if k not in r]
        if miss:
            raise ConfigError(f"indexer recall results {path}: rows[{i}] lacks field '{miss[0]}' (need {ROW_KEYS})")
    return d


def plot_indexer_recall(results, out) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = load(results)
    presets = list(dict.fromkeys(r["preset"] for r in d["rows"]))
    fig, axes = plt.subplots(1, len(presets), figsize=(5.2 * len(presets), 4.2), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rows = [r for r in d["rows"] if r["preset"] == preset and r["recall_mean"] is not None]
        exact = []
        for prec in dict.fromkeys(r["precision"] for r in rows):
            pts = sorted((r["S"], 1 - r["recall_mean"], 1 - r["recall_min"]) for r in rows if r["precision"] == prec)
            if all(p[2] == 0 for p in pts):                  # nothing missed anywhere: no point on a log axis
                exact.append(prec)
                continue
            xs = [p[0] for p in pts]
            ax.plot(xs, [100 * max(p[1], 1e-4) for p in pts], "o-", color=COLORS.get(prec), label=f"{prec} (mean)")
            ax.plot(xs, [100 * max(p[2], 1e-4) for p in pts], "--", lw=0.8, color=COLORS.get(prec), alpha=0.6,
                    label=f"{prec} (worst row)")
        ax.axhline(100 * (1 - PAPER_BF16), ls=":", color="k", lw=1, label="paper, bf16 scores: 0.3 % missed")
        r0 = rows[0]
        heads = f"HI {r0.get('index_n_heads', '?')}, DI {r0.get('index_head_dim', '?')}"
        ax.set(xscale="log", yscale="log", xlabel="visible compressed entries S (context / 4)",
               ylabel="exact top-k entries missed (%, = 100 - recall)",
               title=f"{preset}: {heads}, k {r0['k']}" + (f"; {', '.join(exact)}: none missed" if exact else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="best")
    fig.suptitle("Indexer top-k recall vs the precision the scores are stored in\n"
                 "claim boundary: random q, k ~ N(0, 1/DI), w ~ N(0, 1/HI); exact set from fp64 scores; ties broken "
                 "at random (expected recall)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def plot_committed(results, out_dir) -> list[Path]:
    """`make reproduce`: figures/indexer_recall.png from the committed JSON; one line and nothing drawn when absent."""
    if not Path(results).exists():
        print(f"[figures] indexer recall: {results} not committed, figure not drawn")
        return []
    return [plot_indexer_recall(results, Path(out_dir) / "indexer_recall.png")]
