"""benchmarks/bench_indexer_recall.py and its figure: expected top-k recall under reduced score precision, with
ties broken at random (so no kernel's tie order matters), and the figure drawn from the JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4_lab.config import ConfigError
from dsv4_lab.figures.indexer_recall import load, plot_committed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_indexer_recall as bench  # noqa: E402


def test_expected_recall_counts_ties_as_a_random_choice():
    exact = torch.arange(10, 0, -1, dtype=torch.float64)              # top 3 = entries 0, 1, 2, no ties
    assert bench.expected_recall(exact, exact.clone(), 3) == (1.0, 3)
    flat = torch.zeros(10, dtype=torch.float64)                        # every entry tied: each picked w.p. 3/10
    assert bench.expected_recall(exact, flat, 3) == (pytest.approx(0.3), 3)
    approx = torch.tensor([5, 5, 4, 4, 4, 0, 0, 0, 0, 0], dtype=torch.float64)   # 0, 1 sure; 2 w.p. 1/3
    assert bench.expected_recall(exact, approx, 3) == (pytest.approx((2 + 1 / 3) / 3), 3)
    tied_exact = torch.tensor([3, 2, 0, 0, 0, 0], dtype=torch.float64)  # k-th value 0 is tied: exact set = {0, 1}
    assert bench.expected_recall(tied_exact, tied_exact.clone(), 4) == (1.0, 2)
    value, n = bench.expected_recall(torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 2)
    assert n == 0 and value != value                                    # nothing is exact: no recall


def test_rounding_to_each_precision():
    s = torch.tensor([1e-3, 0.1, 1 / 3, 7.0, -2.5], dtype=torch.float64)
    assert torch.equal(bench.rounded(s, "fp32"), s.float().double())
    assert torch.equal(bench.rounded(s, "bf16"), s.bfloat16().double())
    f8 = bench.rounded(s, "fp8_e4m3")
    assert f8[3] == 7.0 and (f8 - s).abs().max() <= 7.0 / 448 * 16   # the max maps to 448 exactly; E4M3 steps
    assert torch.equal(torch.sign(f8[1:]), torch.sign(s[1:]))


def test_bench_writes_json_and_the_figure_draws(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--presets", "tiny", "--lengths", "64", "256", "--rows", "3", "--out", str(out)]) == 0
    d = load(out)
    assert {r["precision"] for r in d["rows"]} == set(bench.PRECISIONS) and {r["S"] for r in d["rows"]} == {64, 256}
    assert all(r["recall_mean"] == 1.0 for r in d["rows"] if r["precision"] == "fp32" and r["rows"])
    assert all(0 <= r["recall_min"] <= r["recall_mean"] <= 1 for r in d["rows"] if r["rows"])
    made = plot_committed(out, tmp_path / "fig")
    assert made and made[0].stat().st_size > 10_000
    assert plot_committed(tmp_path / "absent.json", tmp_path / "fig") == []
    assert "not committed" in capsys.readouterr().out


def test_bad_inputs_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_indexer_recall.py"), "--presets", "nope",
                        "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"preset": "flash", "S": 8}]}))
    with pytest.raises(ConfigError, match="rows\\[0\\] lacks field 'k'"):
        load(bad)


def test_committed_results_say_what_the_docs_quote():
    """The numbers benchmarks/README.md quotes come from the committed JSON (flash shape, S = 262144)."""
    d = load(ROOT / "benchmarks" / "results" / "indexer_recall.json")
    at = {r["precision"]: r for r in d["rows"] if r["preset"] == "flash" and r["S"] == 262144}
    assert at["fp32"]["recall_mean"] == 1.0
    assert round(100 * at["bf16"]["recall_mean"], 2) == 99.15 and round(100 * at["fp16"]["recall_mean"], 1) == 99.9
    assert round(100 * at["fp8_e4m3"]["recall_mean"], 1) == 84.4
