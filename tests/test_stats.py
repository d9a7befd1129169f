"""Paired statistics (dsv4_lab/stats.py) on synthetic data with a known truth."""
import math

import numpy as np
import pytest

from dsv4_lab.stats import compare_arms, holm, paired_test, t_quantile, t_sf2, verdict


def test_t_distribution_matches_tables():
    # published two-sided 95 % critical values (any t table); bisection to 1e-12, the CDF to ~1e-14
    for df, crit in [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (9, 2.2621572), (29, 2.0452296)]:
        assert math.isclose(t_quantile(0.975, df), crit, rel_tol=1e-7)
        assert math.isclose(t_sf2(crit, df), 0.05, rel_tol=1e-6)
    assert math.isclose(t_sf2(0.0, 5), 1.0)


def test_holm_step_down():
    # p sorted 0.01, 0.02, 0.04 with m = 3: 0.03, 0.04, 0.04 (monotone); nan is not counted
    assert holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)


def test_pairing_removes_seed_noise():
    # a large per-seed offset shared by both arms (the data order) and a small true effect: paired detects it
    rng = np.random.default_rng(0)
    seed_offset = rng.normal(0, 1.0, 5)
    base = {s: 3.0 + seed_offset[s] + rng.normal(0, 0.01) for s in range(5)}
    arm = {s: 3.0 + seed_offset[s] - 0.1 + rng.normal(0, 0.01) for s in range(5)}
    row, = compare_arms({"base": base, "arm": arm}, "base", lower_is_better=True)
    assert row["n_seeds"] == 5 and row["verdict"] == "better" and row["ci_high"] < 0 < row["p_holm"] < 0.05
    row, = compare_arms({"base": base, "arm": arm}, "base", lower_is_better=False)
    assert row["verdict"] == "worse"


def test_seeds_missing_from_one_arm_are_not_paired():
    row, = compare_arms({"b": {0: 1.0, 1: 2.0, 2: 3.0}, "a": {1: 2.5, 2: 3.1, 7: 0.0}}, "b")
    assert row["n_seeds"] == 2 and row["mean_diff"] == pytest.approx(0.3)
    row, = compare_arms({"b": {0: 1.0}, "a": {0: 2.0}}, "b")
    assert row["n_seeds"] == 1 and row["verdict"] == "too few seeds" and math.isnan(row["p"])   # not a null


def _rejection_rate(n_seeds, effect, method, n_exp, seed):
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n_exp):
        d = rng.normal(effect, 1.0, n_seeds)
        r = paired_test(d, method, seed=i)
        hits += verdict(r["mean_diff"], r["p"], True) != "null"
    return hits / n_exp


@pytest.mark.parametrize("n_seeds", [3, 5, 10])
def test_false_positive_rate_near_5_percent(n_seeds):
    # 2000 experiments with no effect: rate ~ Binomial(2000, 0.05) / 2000, sd 0.0049; accept +- 4 sd
    rate = _rejection_rate(n_seeds, 0.0, "t", 2000, seed=n_seeds)
    assert 0.05 - 4 * 0.0049 < rate < 0.05 + 4 * 0.0049, rate


def test_power_grows_with_seeds():
    # true effect = 1 sd of the paired difference; t-test power ~ 0.13 (n=3), 0.40 (5), 0.80 (10), 0.99 (20)
    power = [_rejection_rate(n, -1.0, "t", 1000, seed=100 + n) for n in (3, 5, 10, 20)]
    assert all(a < b for a, b in zip(power, power[1:])), power
    assert power[0] < 0.3 and power[-1] > 0.9, power


def test_bootstrap_method_calibrated_and_seeded():
    # sign-flip p is exact under symmetry: with n = 8 the false-positive rate stays <= 5 % (+ binomial slack)
    rate = _rejection_rate(8, 0.0, "bootstrap", 600, seed=7)
    assert rate < 0.05 + 4 * math.sqrt(0.05 * 0.95 / 600), rate
    d = [1.0, 2.0, 0.5, 3.0, 1.0, 2.0, 4.0, 1.0]   # all positive: only the all-plus and all-minus flips reach it
    a, b = paired_test(d, "bootstrap", seed=3), paired_test(d, "bootstrap", seed=3)
    assert a == b and a["ci_low"] < a["mean_diff"] < a["ci_high"] and a["p"] == pytest.approx(2 / 256)
    # with 5 seeds the sign-flip test cannot reach 0.05 (smallest p = 2/32): stated in stats.py
    assert paired_test([1.0] * 5, "bootstrap")["p"] == pytest.approx(2 / 32)


def test_bad_method_and_missing_baseline():
    with pytest.raises(ValueError, match="method"):
        paired_test([1.0, 2.0], "wilcoxon")
    with pytest.raises(ValueError, match="baseline"):
        compare_arms({"a": {0: 1.0}}, "b")
