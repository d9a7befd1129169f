import math

from dsv4_lab.stats import compare, mean_std, summarize_sweep


def test_mean_std():
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(s, 1.0)


def test_verdicts():
    base = [2.00, 2.01, 1.99]
    assert compare(base, [1.80, 1.81, 1.79])["verdict"] == "arm better"
    assert compare(base, [2.20, 2.21, 2.19])["verdict"] == "arm worse"
    assert compare(base, [2.005, 1.995, 2.01])["verdict"] == "null (within noise)"
    assert compare(base[:2], [1.0, 1.0])["verdict"].startswith("insufficient")
    assert compare(base, [0.5, 0.6, 0.4], lower_is_better=False)["verdict"] == "arm worse"


def test_summarize_sweep():
    res = [{"arm": a, "seed": s, "last": {"val_loss": v}} for a, vals in
           {"base": [2.0, 2.1, 1.9], "x": [1.0, 1.1, 0.9]}.items() for s, v in enumerate(vals)]
    rows = summarize_sweep(res)
    assert rows[0]["arm"] == "base" and rows[0]["effect"] == 0
    assert rows[1]["verdict"] == "arm better" and math.isclose(rows[1]["effect"], -1.0)
