"""The data path of DeepSeek-V4 as a picture (docs/architecture.md, "The data path"): boxes and arrows, matplotlib
only, no data. `python -m dsv4_lab.figures.architecture [out.png]` writes figures/architecture.png."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# (x, y) centres in a 100 x 130 canvas; colours by family
C_IO, C_MHC, C_ATT, C_MOE, C_CACHE = "#e8eef7", "#f3e6f5", "#e3f2e1", "#fdf0dc", "#eeeeee"


def _box(ax, x, y, w, h, text, color, fs=9, bold=False):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.4,rounding_size=1.5",
                                fc=color, ec="#444444", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fs, weight="bold" if bold else "normal", wrap=True)


def _arrow(ax, a, b, style="-|>", ls="-", color="#333333"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, lw=1.1, ls=ls, color=color))


def draw(out: str | Path = "figures/architecture.png") -> Path:
    fig, ax = plt.subplots(figsize=(9, 12.5))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 130)
    ax.axis("off")

    _box(ax, 50, 125, 40, 5, "token ids  (B, T)", C_IO, bold=True)
    _box(ax, 50, 117, 40, 5, "embedding E[id]  (B, T, d)", C_IO)
    _box(ax, 50, 109, 56, 5, "copy into n_hc = 4 residual streams X  (B, T, n_hc, d)   §1.1", C_MHC)
    for a, b in [((50, 122.3), (50, 119.7)), ((50, 114.3), (50, 111.7)), ((50, 106.3), (50, 101.5))]:
        _arrow(ax, a, b)

    # the block frame
    ax.add_patch(FancyBboxPatch((6, 31), 88, 70, boxstyle="round,pad=0.6,rounding_size=2", fc="none",
                                ec="#777777", lw=1.2, ls="--"))
    ax.text(8, 99, "block l = 0 .. L-1  (mHC around each sub-layer, §1.2)", fontsize=9, style="italic", va="top")

    _box(ax, 50, 93, 60, 5, "mHC pre: u = Σ A_i x_i,  A = σ(.)+ε;  RMSNorm   §1.2", C_MHC)
    _box(ax, 20, 81, 24, 9, "SWA\nwindow of n_win\nentries (incl. t)", C_ATT)
    _box(ax, 50, 81, 30, 9, "CSA  §2.3-2.4\nwindow + compressor m=4\n+ lightning indexer top-k", C_ATT)
    _box(ax, 80, 81, 24, 9, "HCA  §3\nwindow + compressor\nm'=128, all visible", C_ATT)
    for x in (20, 50, 80):
        _arrow(ax, (50, 90.3), (x, 86))
    _box(ax, 50, 69, 70, 6, "one softmax over window ∪ compressed entries + sink;\n"
                            "partial RoPE, output de-rotation, grouped output projection   §2.5-2.7", C_ATT)
    for x in (20, 50, 80):
        _arrow(ax, (x, 76.3), (50 if x == 50 else x * 0.5 + 25, 72.3))
    _box(ax, 50, 59, 64, 5, "mHC post: x'_j = C_j y + Σ_i P_ij x_i,  P = Sinkhorn(.)   §1.2", C_MHC)
    _box(ax, 50, 51, 40, 5, "mHC pre + RMSNorm", C_MHC)
    _box(ax, 30, 41, 32, 8, "router  §5.1-5.2\nhash table (first layers) or\n√softplus top-k with bias", C_MOE)
    _box(ax, 70, 41, 34, 8, "K_r routed SwiGLU experts\n(clamped, §5.3) + shared expert", C_MOE)
    _box(ax, 50, 34.5, 30, 4, "mHC post", C_MHC)
    _arrow(ax, (50, 66), (50, 61.7))
    _arrow(ax, (50, 56.3), (50, 53.7))
    _arrow(ax, (45, 48.3), (32, 45.2))
    _arrow(ax, (46.3, 41), (52.7, 41))
    _arrow(ax, (70, 36.8), (58, 35.5))

    _box(ax, 35, 22, 44, 7, "hc_head collapse → RMSNorm → LM head\nlogits (B, T, V)   §1.1", C_IO, bold=True)
    _box(ax, 79, 22, 26, 7, "MTP block  §9\n(SWA, own hc_head,\nshared head)", C_IO)
    _arrow(ax, (50, 30.3), (37, 25.7))
    _arrow(ax, (55, 30.3), (75, 25.7))

    _box(ax, 50, 8, 84, 9, "KV cache for decode  §6\nstate: window ring (slot p mod n_win) + compressor tails per layer;"
                            "  blocks: compressed entries + indexer keys\n(FP8 + BF16 RoPE dims, MXFP4 indexer keys "
                            "with storage='paper')", C_CACHE, fs=8.5)
    _arrow(ax, (92, 12.7), (92, 76), style="-|>", ls="--", color="#777777")
    ax.text(93, 45, "decode reads\nand appends", fontsize=7.5, color="#555555", rotation=90, va="center")

    ax.set_title("DeepSeek-V4 in dsv4-lab: the data path (§ = docs/architecture.md)", fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(sys.argv[1] if len(sys.argv) > 1 else "figures/architecture.png"))
