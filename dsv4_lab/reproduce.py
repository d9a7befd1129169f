"""`make reproduce`: the lab's main job at CPU defaults (<= 20 minutes on 2 cores).

It trains the tiny arms of `ablations/reproduce.json` (the dense baseline and the tiny DeepSeek-V4 lab model, on
the stdlib byte corpus), writes their run records under runs/reproduce/, then regenerates every figure in
figures/ from saved records. Re-running skips finished runs and resumes interrupted ones.

    python -m dsv4_lab reproduce [root=runs] [sweep=ablations/reproduce.json]
"""
from __future__ import annotations

import time
from pathlib import Path

from .sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def make_figures(runs_root: str = "runs", out: str = "figures", groups: list[str] | None = None) -> list[Path]:
    """Loss curves of every sweep group under runs_root (or only `groups`; run dirs at any depth, tuning runs
    left out), the efficiency figures (analytic, and measured from benchmarks/results/efficiency_measured.json when
    it is there), the ablation figures from the committed ablations/results/*.csv, the long-context quality
    figure from ablations/results/long_context.json when it is there, and the indexer recall figure from
    benchmarks/results/indexer_recall.json."""
    from .figures.loss_curves import plot_loss_curves
    made = []
    for group in sorted(Path(runs_root).glob("*")):
        if groups is not None and group.name not in groups:
            continue
        dirs = sorted(m.parent for m in group.rglob("metrics.jsonl") if m.parent.parent.name != "select")
        if dirs:
            made.append(plot_loss_curves(dirs, Path(out) / f"loss_{group.name}.png", title=f"{group.name}"))
    try:
        from .figures.efficiency import plot_efficiency
    except ImportError:
        plot_efficiency = None
    if plot_efficiency is not None:
        res = plot_efficiency(out_dir=out)
        made += [Path(p) for p in (res if isinstance(res, (list, tuple)) else [])]
    from .figures.efficiency_measured import plot_efficiency_measured   # GPU-measured curves, from the committed JSON
    made += plot_efficiency_measured(ROOT / "benchmarks" / "results" / "efficiency_measured.json", out)
    from .figures.ablation import plot_all           # ablation_<name>.png from the committed ablations/results
    made += plot_all(ROOT / "ablations" / "results", out, ROOT / "ablations")
    from .figures.long_context import plot_committed   # long-context quality vs length, from the committed JSON
    made += plot_committed(ROOT / "ablations" / "results" / "long_context.json", out)
    from .figures.indexer_recall import plot_committed as plot_recall   # top-k recall vs score precision (CPU JSON)
    made += plot_recall(ROOT / "benchmarks" / "results" / "indexer_recall.json", out)
    return made


def measure_speculative(run_dirs, out: str = "figures", n_prompts: int = 4, prompt_len: int = 64,
                        new_tokens: int = 48) -> Path | None:
    """MTP self-speculative decoding on the trained runs that have MTP: acceptance rate on validation prompts.
    Writes <out>/speculative.json (with each run's config and env) and returns its path."""
    from .config import ModelConfig
    from .data import Batches
    from .inference.speculative import speculative_generate
    from .model import DSV4LM
    from .runlog import environment, load_checkpoint, load_json, repo_relative, save_json
    rows = []
    for rd in map(Path, run_dirs):
        if not (rd / "ckpt.pt").exists():
            continue
        cfg = load_json(rd / "config.json")
        mc = ModelConfig.from_dict(cfg["model"])
        if mc.mtp_depth < 1:
            continue
        model = DSV4LM(mc)
        model.load_state_dict(load_checkpoint(rd / "ckpt.pt", map_location="cpu")["model"])
        x, _ = Batches(cfg["train"]["data"], prompt_len, n_prompts, seed=123).val_batch(0)
        ids, stats = speculative_generate(model, x, new_tokens)
        row = {"run": str(rd.resolve()), "prompts": n_prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
               **stats, "config": cfg, "env": load_json(rd / "env.json")}
        rows.append(repo_relative(row))                               # committed records name no machine path
    if not rows:
        return None
    path = Path(out) / "speculative.json"
    save_json({"what": "MTP self-speculative greedy decoding on validation prompts (dsv4_lab/inference/speculative.py)",
               "measured_with": environment("cpu"), "runs": rows}, path)
    return path


REPRODUCE_KEYS = ("root", "sweep", "figures")


def parse_args(args: list[str]) -> dict:
    """`key=value` arguments of `reproduce`; ConfigError naming a malformed or unknown one, or a missing sweep file."""
    from .config import ConfigError
    kv = {}
    for a in args:
        k, eq, v = a.partition("=")
        if not eq:
            raise ConfigError(f"reproduce argument {a!r} is not of the form key=value "
                              f"(keys: {', '.join(REPRODUCE_KEYS)})")
        if k.strip() not in REPRODUCE_KEYS:
            raise ConfigError(f"unknown reproduce key {k.strip()!r}; allowed keys: {', '.join(REPRODUCE_KEYS)}")
        if not v.strip():
            raise ConfigError(f"reproduce key '{k.strip()}' is empty; give a path")
        kv[k.strip()] = v.strip()
    sweep = Path(kv.get("sweep", ROOT / "ablations" / "reproduce.json"))
    if not sweep.is_file():
        raise ConfigError(f"reproduce sweep={str(sweep)!r}: no such file (a sweep definition, e.g. "
                          "ablations/reproduce.json)")
    return kv


def reproduce(args: list[str]) -> int:
    kv = parse_args(args)
    root = kv.get("root", "runs")
    sweep_path = Path(kv.get("sweep", ROOT / "ablations" / "reproduce.json"))
    t0 = time.time()
    sweep = load_sweep(sweep_path)
    print(f"[reproduce] sweep {sweep['name']}: {len(sweep['arms'])} arms x {len(sweep.get('seeds', [0]))} seeds",
          flush=True)
    results = run_sweep(sweep, root)
    for r in results:
        last = r["last"]
        print(f"[reproduce] {r['arm']:>12} seed {r['seed']}: val_loss {last.get('val_loss', float('nan')):.4f} "
              f"({r['run_dir']})", flush=True)
    figs = make_figures(root, kv.get("figures", str(ROOT / "figures")), groups=[sweep["name"]])
    spec = measure_speculative([r["run_dir"] for r in results], kv.get("figures", str(ROOT / "figures")))
    if spec is not None:
        import json
        for row in json.loads(spec.read_text())["runs"]:
            print(f"[reproduce] speculative decoding {row['run']}: acceptance {row['acceptance_rate']:.2f}, "
                  f"{row['tokens_per_main_call']:.2f} tokens per main-model call")
        figs.append(spec)
    for f in figs:
        print(f"[reproduce] figure {f}")
    print(f"[reproduce] done in {time.time() - t0:.0f} s")
    return 0
