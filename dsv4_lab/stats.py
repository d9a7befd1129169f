"""Honest statistics for ablations (docs/methodology.md §3.9): per-arm mean and spread over seeds, and a verdict that
calls an effect real only when it exceeds about twice the seed-to-seed spread. A null result is reported as null.
"""
from __future__ import annotations

import math


def mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, s


def compare(baseline: list[float], arm: list[float], lower_is_better: bool = True, k: float = 2.0) -> dict:
    """Effect of `arm` vs `baseline` on one metric, with the verdict rule |effect| > k * max(spread)."""
    mb, sb = mean_std(baseline)
    ma, sa = mean_std(arm)
    effect = ma - mb
    spread = max(s for s in (sb, sa) if not math.isnan(s)) if len(baseline) > 1 or len(arm) > 1 else float("nan")
    if min(len(baseline), len(arm)) < 3:
        verdict = "insufficient seeds (< 3 per arm)"
    elif abs(effect) > k * spread:
        better = (effect < 0) == lower_is_better
        verdict = "arm better" if better else "arm worse"
    else:
        verdict = "null (within noise)"
    return {"baseline_mean": mb, "baseline_std": sb, "arm_mean": ma, "arm_std": sa, "effect": effect,
            "spread": spread, "n_baseline": len(baseline), "n_arm": len(arm), "verdict": verdict}


def summarize_sweep(results: list[dict], metric: str = "val_loss", baseline: str | None = None,
                    lower_is_better: bool = True) -> list[dict]:
    """results: run_sweep() output. One row per arm against the baseline arm (the first arm by default)."""
    by_arm: dict[str, list[float]] = {}
    for r in results:
        v = r["last"].get(metric)
        if v is not None:
            by_arm.setdefault(r["arm"], []).append(float(v))
    if not by_arm:
        return []
    base = baseline or next(iter(by_arm))
    return [{"arm": a, "metric": metric, **compare(by_arm[base], xs, lower_is_better)} for a, xs in by_arm.items()]
