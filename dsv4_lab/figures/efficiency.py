"""The paper's teaser (FLOPs per token and accumulated KV cache vs context length, docs §A) for V3.2 /
V4-Flash / V4-Pro, and the same curves for the lab presets with measured points.

    from dsv4_lab.figures.efficiency import plot_efficiency
    plot_efficiency("figures")   # efficiency_paper.{png,csv}, efficiency_lab.{png,csv}, efficiency.json

What is analytic and what is measured (also written into efficiency.json):
* every curve is analytic (dsv4_lab.accounting: FLOPs from the shapes, KV bytes from the storage format);
* lab markers "cache" are measured: the bytes the real KV cache (dsv4_lab.inference.cache) allocates for a
  sequence of that length, read from its tensors (batch 1);
* lab markers "CPU ms/token" are measured: wall-clock per decoded token of the tiny preset on this machine's CPU
  (1 thread, fp32, randomly initialised weights, median of a few steps after a cached prefill).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import accounting as acc
from ..config import ModelConfig

PAPER_MODELS = {"v3.2": "DeepSeek-V3.2", "v4-flash": "DeepSeek-V4-Flash", "v4-pro": "DeepSeek-V4-Pro"}


def lab_models() -> dict[str, ModelConfig]:
    """The lab presets in their dense-baseline and V4 (Flash-like schedule) forms."""
    return {
        "tiny dense*4": ModelConfig.from_preset("tiny", layer_types="dense*4"),
        "tiny flash:4": ModelConfig.from_preset("tiny", layer_types="flash:4"),
        "small dense*8": ModelConfig.from_preset("small", layer_types="dense*8"),
        "small flash:8": ModelConfig.from_preset("small", layer_types="flash:8"),
    }


def context_grid(lo: int, hi: int, per_decade: int = 8, extra=()) -> list[int]:
    g = np.unique(np.round(np.logspace(np.log10(lo), np.log10(hi), int(per_decade * np.log10(hi / lo)) + 1)))
    return sorted(set(int(x) for x in g) | set(int(x) for x in extra if lo <= x <= hi))


def paper_rows(contexts) -> list[dict]:
    rows = []
    for name in PAPER_MODELS:
        L = acc.n_layers(name)
        for n in contexts:
            f = acc.decode_flops(name, n, breakdown=True)
            rows.append({"model": name, "context_len": n, "flops_fp8_equiv": f["total"],
                         "flops_plain": acc.decode_flops(name, n, "plain"), "flops_dense": f["dense"],
                         "flops_core_attn": f["core_attn"], "flops_indexer": f["indexer"],
                         "kv_bytes": acc.kv_cache_bytes(name, n), "gqa8_bytes": acc.gqa_kv_bytes(n, L)})
    return rows


def lab_rows(contexts) -> list[dict]:
    rows = []
    for name, cfg in lab_models().items():
        for n in contexts:
            rows.append({"model": name, "context_len": n, "flops_plain": acc.decode_flops(cfg, n, "plain"),
                         "kv_bytes_fp32": acc.kv_cache_bytes(cfg, n, "fp32"),
                         "kv_bytes_fp32_with_state": acc.kv_cache_bytes(cfg, n, "fp32", include_state=True),
                         "kv_bytes_paper": acc.kv_cache_bytes(cfg, n, "paper")})
    return rows


def measure_cache_bytes(cfg: ModelConfig, lengths, storage: str = "fp32") -> list[dict]:
    """Bytes the real cache allocates for one sequence of each length (no forward pass needed)."""
    import torch

    from ..model import DSV4LM
    out = []
    with torch.device("meta"):                                   # shapes only: no weights are materialised
        model = DSV4LM(cfg.replace(max_seq_len=max(max(lengths), cfg.max_seq_len)))
    for n in lengths:
        cache = model.new_cache(1, n, storage=storage, device="cpu")
        out.append({"context_len": n, "measured_cache_bytes": cache.nbytes(include_state=True),
                    "analytic_cache_bytes": acc.kv_cache_bytes(model.cfg, n, storage, include_state=True)})
        del cache
    return out


def measure_decode_ms(cfg: ModelConfig, contexts, steps: int = 6, prefill_chunk: int = 256) -> list[dict]:
    """CPU wall-clock per decoded token at each context: cached prefill in chunks, then `steps` single tokens."""
    import torch

    from ..model import DSV4LM
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        top = max(contexts) + steps + 1
        torch.manual_seed(0)
        model = DSV4LM(cfg.replace(max_seq_len=max(top, cfg.max_seq_len))).eval()
        for n in contexts:
            ids = torch.randint(0, cfg.vocab_size, (1, n + steps))
            cache = model.new_cache(1, n + steps)
            with torch.no_grad():
                for s in range(0, n, prefill_chunk):
                    model(ids[:, s:min(n, s + prefill_chunk)], cache=cache)
                times = []
                for i in range(steps):
                    t0 = time.perf_counter()
                    model(ids[:, n + i:n + i + 1], cache=cache)
                    times.append(time.perf_counter() - t0)
            out.append({"context_len": n, "cpu_ms_per_token": 1e3 * float(np.median(times))})
    finally:
        torch.set_num_threads(old)
    return out


def plot_efficiency(out_dir: str = "figures", measure: bool = True) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    # ---- the paper's models ---------------------------------------------------------------------------------------
    ctx = context_grid(1024, 2**20, extra=(32 * 1024, 128 * 1024, 10**6))
    prow = pd.DataFrame(paper_rows(ctx))
    prow.to_csv(out / "efficiency_paper.csv", index=False)
    made.append(out / "efficiency_paper.csv")
    table = acc.efficiency_table(10**6)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, g in prow.groupby("model", sort=False):
        axes[0].plot(g["context_len"], g["flops_fp8_equiv"] / 1e9, label=PAPER_MODELS[name])
        axes[1].plot(g["context_len"], g["kv_bytes"] / 2**30, label=PAPER_MODELS[name])
    g = prow[prow.model == "v4-pro"]
    axes[1].plot(g["context_len"], g["gqa8_bytes"] / 2**30, "k--", lw=0.8, label="BF16 GQA-8 (61 layers)")
    rows = {r["model"]: r for r in table}
    for i, (key, unit) in enumerate([("flops_ratio", "FLOPs"), ("kv_ratio", "KV")]):
        txt = "\n".join(f"{PAPER_MODELS[m].split('-', 1)[1]}: {100 * rows[m][key]:.1f}% of V3.2 {unit} at 1M"
                        for m in ("v4-pro", "v4-flash"))
        axes[i].text(0.03, 0.97, txt, transform=axes[i].transAxes, va="top", fontsize=8)
    axes[0].set(ylabel="single-token FLOPs (G, equivalent FP8)", title="Inference FLOPs per token (analytic)")
    axes[1].set(ylabel="accumulated KV cache (GiB, one sequence)", title="KV cache (analytic, paper storage)")
    for a in axes:
        a.set(xscale="log", yscale="log", xlabel="context length (tokens)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "efficiency_paper.png", dpi=120)
    plt.close(fig)
    made.append(out / "efficiency_paper.png")

    # ---- the lab presets ------------------------------------------------------------------------------------------
    lctx = context_grid(64, 2**20)
    lrow = pd.DataFrame(lab_rows(lctx))
    measured = {"cache_bytes": {}, "cpu_ms_per_token": {}, "notes": []}
    if measure:
        models = lab_models()
        try:
            for name in ("tiny dense*4", "tiny flash:4"):
                measured["cache_bytes"][name] = measure_cache_bytes(models[name], [256, 512, 1024, 2048, 4096])
            for name in ("small dense*8", "small flash:8"):
                measured["cache_bytes"][name] = measure_cache_bytes(models[name], [1024, 4096])
            for name in ("tiny dense*4", "tiny flash:4"):
                measured["cpu_ms_per_token"][name] = measure_decode_ms(models[name], [64, 256, 1024])
        except (ImportError, AttributeError, NotImplementedError) as e:
            measured["notes"].append(f"measurement skipped: {type(e).__name__}: {e}")
    mrows = [{"model": k, "kind": kind, **r} for kind in ("cache_bytes", "cpu_ms_per_token")
             for k, v in measured[kind].items() for r in v]
    pd.concat([lrow.assign(kind="analytic"), pd.DataFrame(mrows)], ignore_index=True).to_csv(
        out / "efficiency_lab.csv", index=False)
    made.append(out / "efficiency_lab.csv")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {}
    for name, g in lrow.groupby("model", sort=False):
        l, = axes[0].plot(g["context_len"], g["flops_plain"] / 1e6, label=name)
        colors[name] = l.get_color()
        axes[1].plot(g["context_len"], g["kv_bytes_fp32_with_state"] / 2**20, color=l.get_color(), label=name)
        axes[1].plot(g["context_len"], g["kv_bytes_paper"] / 2**20, color=l.get_color(), ls=":", lw=0.8)
    for name, pts in measured["cache_bytes"].items():
        axes[1].plot([p["context_len"] for p in pts], [p["measured_cache_bytes"] / 2**20 for p in pts], "o",
                     color=colors[name], mfc="none", label=f"{name} measured cache")
    for name, pts in measured["cpu_ms_per_token"].items():
        axes[2].plot([p["context_len"] for p in pts], [p["cpu_ms_per_token"] for p in pts], "o-",
                     color=colors[name], label=name)
    axes[0].set(ylabel="FLOPs per decoded token (M, plain)", title="lab presets: FLOPs per token (analytic)")
    axes[1].set(ylabel="KV cache (MiB, one sequence)",
                title="KV cache: fp32 + states (solid), paper storage (dotted)")
    axes[2].set(ylabel="ms per decoded token", title="tiny: measured CPU decode (1 thread)")
    for a in axes:
        a.set(xscale="log", xlabel="context length (tokens)")
        a.grid(alpha=0.3, which="both")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    if not measured["cpu_ms_per_token"]:
        axes[2].text(0.5, 0.5, "no measurement\n" + "\n".join(measured["notes"])[:200], ha="center",
                     transform=axes[2].transAxes, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "efficiency_lab.png", dpi=120)
    plt.close(fig)
    made.append(out / "efficiency_lab.png")

    # ---- what it was drawn from -----------------------------------------------------------------------------------
    info = {
        "analytic": "all curves: dsv4_lab.accounting (FLOPs from shapes, docs §A, §B, §C; KV bytes from storage format)",
        "measured": "lab 'measured cache' markers = bytes allocated by dsv4_lab.inference.cache (batch 1); "
                    "'ms per decoded token' = CPU wall-clock, tiny preset, 1 thread, fp32, random weights",
        "flops_unit_paper": "equivalent FP8 FLOPs (BF16 x2, FP8 x1, FP4 x0.5), docs §A.2",
        "flops_unit_lab": "plain FLOPs",
        "table_1M": table,
        "lab_configs": {k: v.to_dict() for k, v in lab_models().items()},
        "measured_points": measured,
    }
    (out / "efficiency.json").write_text(json.dumps(info, indent=1, default=str))
    made.append(out / "efficiency.json")
    return made
