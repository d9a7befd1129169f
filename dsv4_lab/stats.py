"""Statistics for ablations (docs/methodology.md §3.9): paired differences across seeds, 95 % intervals, Holm.

A seed fixes the data order and the validation batches (dsv4_lab.data.Batches is a pure function of
(seed, step)), so arm and baseline runs of the same seed see the same bytes: the comparison is *paired*.
For each arm vs the baseline, on one metric:

    d_i = arm(seed i) - baseline(seed i)           over the seeds both have (n = n_seeds)
    mean_diff = mean(d),  se = sd(d) / sqrt(n)
    method "t":         95 % CI = mean_diff +- t_{0.975, n-1} se,  p = two-sided paired t-test
    method "bootstrap": 95 % CI = percentile bootstrap of mean(d) (10 000 resamples, seeded),
                        p = sign-flip randomisation test (exact for n <= 16; its smallest p is 2 / 2^n,
                        so n = 5 seeds can never reach p < 0.05: use it for counts only with >= 7 seeds)
    Holm correction across the arms of one sweep (family = the non-baseline arms on that metric);
    verdict = "better" / "worse" (by the metric's direction) when p_holm < 0.05, else "null".

A null says "no effect detectable at this budget and seed count", never "no effect". Everything here is
deterministic: the bootstrap and the randomisation draw from a fixed seed.
"""
from __future__ import annotations

import math
from itertools import product

import numpy as np

ALPHA = 0.05
METHODS = ("t", "bootstrap")


# --------------------------------------------------------------------------------------------------------------
# Student t distribution (no scipy in the lab's environment): CDF from the regularised incomplete beta function
# --------------------------------------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converged to 1e-15 relative."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q in (0.5, 1)) of Student's t, by bisection on the CDF to 1e-12."""
    target = 2.0 * (1.0 - q)                       # two-sided tail mass beyond the quantile
    lo, hi = 0.0, 1e7
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, mid):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------------------------
# paired comparison of one arm against the baseline
# --------------------------------------------------------------------------------------------------------------

def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); nan where undefined."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, s


def mean_band(vals) -> tuple[float, float]:
    """Mean and half-width of its 95 % t-interval over seeds (0 for one value): the bands of the figures."""
    m, sd = mean_std(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, t_quantile(0.975, len(vals) - 1) * sd / math.sqrt(len(vals))


def paired_diffs(baseline: dict, arm: dict) -> tuple[list, np.ndarray]:
    """baseline, arm: {seed: value}. The seeds both have (sorted) and arm - baseline on them."""
    seeds = sorted(set(baseline) & set(arm))
    return seeds, np.array([float(arm[s]) - float(baseline[s]) for s in seeds], dtype=np.float64)


def _sign_flip_p(d: np.ndarray, rng: np.random.Generator, n_random: int = 20000) -> float:
    """Two-sided randomisation p of mean(d) under H0 'd symmetric about 0' (exact for n <= 16)."""
    n = d.size
    obs = abs(d.mean())
    if n <= 16:
        signs = np.array(list(product((-1.0, 1.0), repeat=n)))
    else:
        signs = rng.choice((-1.0, 1.0), size=(n_random, n))
    stats = np.abs((signs * d).mean(1))
    return float(np.mean(stats >= obs - 1e-12 * max(obs, 1e-300)))


def paired_test(d, method: str = "t", alpha: float = ALPHA, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of the paired differences d with its (1 - alpha) interval and a two-sided p-value (unadjusted)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed are {METHODS}")
    d = np.asarray(d, dtype=np.float64)
    n = int(d.size)
    out = {"n_seeds": n, "mean_diff": float(d.mean()) if n else float("nan"), "ci_low": float("nan"),
           "ci_high": float("nan"), "p": float("nan"), "sd_diff": float(d.std(ddof=1)) if n > 1 else float("nan"),
           "method": method}
    if n < 2:
        return out
    m, sd = out["mean_diff"], out["sd_diff"]
    if method == "t":
        se = sd / math.sqrt(n)
        if se == 0.0:                              # identical differences: no noise left to test against
            out.update(ci_low=m, ci_high=m, p=1.0 if m == 0.0 else 0.0)
            return out
        tq = t_quantile(1 - alpha / 2, n - 1)
        out.update(ci_low=m - tq * se, ci_high=m + tq * se, p=t_sf2(m / se, n - 1))
        return out
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    out.update(ci_low=float(lo), ci_high=float(hi), p=_sign_flip_p(d, rng))
    return out


def holm(pvals: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given; nan stays nan and is not counted)."""
    idx = [i for i, p in enumerate(pvals) if not math.isnan(p)]
    m = len(idx)
    adj = [float("nan")] * len(pvals)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvals[i])):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        adj[i] = running
    return adj


TOO_FEW = "too few seeds"


def verdict(mean_diff: float, p_holm: float, lower_is_better: bool, alpha: float = ALPHA) -> str:
    if math.isnan(p_holm) or p_holm >= alpha:
        return "null"
    return "better" if (mean_diff < 0) == lower_is_better else "worse"


def compare_arms(values: dict, baseline: str, lower_is_better: bool = True, method: str = "t",
                 alpha: float = ALPHA, seed: int = 0) -> list[dict]:
    """values: {arm: {seed: metric value}}. One row per non-baseline arm: n_seeds, mean_diff (arm - baseline),
    ci_low, ci_high, p, p_holm (Holm across these arms), verdict."""
    if baseline not in values:
        raise ValueError(f"baseline arm {baseline!r} has no values (arms with values: {sorted(values)})")
    rows = []
    for arm in values:
        if arm == baseline:
            continue
        _, d = paired_diffs(values[baseline], values[arm])
        rows.append({"arm": arm, "baseline": baseline, **paired_test(d, method, alpha, seed=seed)})
    for r, ph in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = ph
        r["verdict"] = (TOO_FEW if r["n_seeds"] < 2           # no interval from one pair: no verdict, not a null
                        else verdict(r["mean_diff"], ph, lower_is_better, alpha))
    return rows
