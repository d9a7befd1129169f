"""benchmarks/bench_loss_parity.py's verdict (collect): finished runs only, paired over seeds against the reference
arm, "within seed noise" only when the whole 95 % interval lies inside the reference arm's seed-to-seed spread."""
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_loss_parity import collect  # noqa: E402

STEPS = 20


def _run(root, name, val, last_step=STEPS - 1):
    rd = Path(root, name)
    rd.mkdir(parents=True)
    recs = [{"step": 9, "train_loss": 3.0, "losses": [3.0] * 10, "val_loss": val + 0.5},
            {"step": last_step, "train_loss": 2.0, "losses": [2.0] * 10, "val_loss": val}]
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_collect_pairs_seeds_and_judges_against_seed_spread(tmp_path):
    ref = {0: 2.00, 1: 2.10, 2: 1.95, 3: 2.05}
    for s, v in ref.items():
        _run(tmp_path, f"reference-s{s}", v)
        _run(tmp_path, f"close-s{s}", v + 0.001 * (s % 2))            # same seeds, tiny paired differences
        _run(tmp_path, f"far-s{s}", v + 0.3 + 0.01 * s)               # a clear shift
    _run(tmp_path, "cut-s0", 1.0, last_step=9)                         # unfinished: never counted
    res = collect(str(tmp_path), ["reference", "close", "far", "cut"], [0, 1, 2, 3], STEPS)
    noise = statistics.stdev(ref.values())
    assert abs(res["seed_noise_std"] - noise) < 1e-12
    rows = {r["arm"]: r for r in res["verdicts"]}
    assert set(rows) == {"close", "far"}                               # "cut" has no finished run
    assert rows["close"]["within_seed_noise"] and rows["close"]["n_seeds"] == 4
    assert abs(rows["close"]["mean_diff"] - 0.0005) < 1e-9
    assert not rows["far"]["within_seed_noise"] and rows["far"]["mean_diff"] > 0.3
    assert not res["runs"]["cut-s0"]["finished"] and res["runs"]["cut-s0"]["steps"] == 10
    assert res["runs"]["reference-s1"]["final_val_loss"] == 2.10


def test_collect_without_enough_reference_runs_gives_no_verdict(tmp_path):
    _run(tmp_path, "reference-s0", 2.0)
    _run(tmp_path, "triton-s0", 2.0)
    res = collect(str(tmp_path), ["reference", "triton"], [0, 1], STEPS)
    assert res["verdicts"] == [] and res["seed_noise_std"] is None
