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


def test_finished_runs_of_the_record_are_reused_only_for_the_same_setup(tmp_path):
    """A fresh machine has no run folders: the finished reference runs of the committed loss_parity.json (same
    preset, steps, seq, batch) stand in for them, marked as such; a run folder that exists wins over the record; a
    fast arm's recorded run is reused only when asked (--keep-recorded; its code is what is checked)."""
    from bench_loss_parity import recorded_runs
    setup = {"preset": "small", "steps": STEPS, "seq": 4096, "batch": 2}
    ref = {0: 2.00, 1: 2.10, 2: 1.95}
    record = {"setup": setup, "runs": {f"reference-s{s}": {"finished": True, "final_val_loss": v, "commit": "abc"}
                                       for s, v in ref.items()}}
    record["runs"]["reference-s3"] = {"finished": False, "steps": 50}           # unfinished: never reused
    record["runs"]["blocks-s0"] = {"finished": True, "final_val_loss": 2.0}     # a fast arm: never reused
    path = tmp_path / "loss_parity.json"
    path.write_text(json.dumps(record))
    assert recorded_runs(str(path), {**setup, "steps": STEPS + 1}) == {}        # another setup: nothing reused
    assert recorded_runs(str(tmp_path / "missing.json"), setup) == {}
    rec = recorded_runs(str(path), setup)
    assert sorted(rec) == ["reference-s0", "reference-s1", "reference-s2"]
    both = recorded_runs(str(path), setup, ("reference", "blocks"))            # --keep-recorded: the fast arm too
    assert sorted(both) == ["blocks-s0", "reference-s0", "reference-s1", "reference-s2"]
    root = tmp_path / "runs"
    for s, v in ref.items():
        _run(root, f"blocks-s{s}", v + 0.01)
    _run(root, "reference-s2", 1.5)                                             # this folder wins over the record
    res = collect(str(root), ["reference", "blocks"], [0, 1, 2], STEPS, rec)
    assert res["runs"]["reference-s0"]["from"] == "loss_parity.json" and res["runs"]["reference-s0"]["commit"] == "abc"
    assert res["final_val_loss"]["reference"] == {0: 2.00, 1: 2.10, 2: 1.5}
    assert "from" not in res["runs"]["reference-s2"] and "from" not in res["runs"]["blocks-s0"]
    row = res["verdicts"][0]
    assert row["arm"] == "blocks" and row["n_seeds"] == 3


def test_seeds_needed_is_the_smallest_n_whose_interval_fits_the_seed_noise():
    """An interval around the observed mean difference, of the observed spread, inside the seed noise."""
    from bench_loss_parity import seeds_needed

    from dsv4_lab.stats import t_quantile

    def half(n, sd):
        return t_quantile(0.975, n - 1) * sd / n ** 0.5
    noise = 0.07
    for sd in (0.01, 0.05, 2 ** 0.5 * noise, 0.2):
        n = seeds_needed(sd, noise)
        assert half(n, sd) < noise and (n == 2 or half(n - 1, sd) >= noise), (sd, n)
    assert seeds_needed(2 ** 0.5 * noise, noise) in (11, 12, 13)        # decorrelated runs: about a dozen seeds
    assert seeds_needed(float("nan"), noise) is None and seeds_needed(0.1, None) is None
    # a mean shift leaves less room: more seeds, and none at all once the shift alone reaches the noise
    for sd in (0.01, 0.05):
        n = seeds_needed(sd, noise, -0.03)
        assert 0.03 + half(n, sd) < noise and (n == 2 or 0.03 + half(n - 1, sd) >= noise), (sd, n)
        assert n >= seeds_needed(sd, noise)
    assert seeds_needed(0.01, noise, 0.07) is None and seeds_needed(0.01, noise, float("nan")) is None


def test_compiled_arm_is_also_judged_against_the_eager_kernel_arm(tmp_path):
    """With both fast arms, `blocks` is also compared with `triton` (what compilation alone changes), paired over the
    same seeds; the reference comparisons stay as they were."""
    ref = {0: 2.00, 1: 2.10, 2: 1.95}
    for s, v in ref.items():
        _run(tmp_path, f"reference-s{s}", v)
        _run(tmp_path, f"triton-s{s}", v + 0.01 * s)
        _run(tmp_path, f"blocks-s{s}", v + 0.01 * s + 0.2)
    res = collect(str(tmp_path), ["reference", "triton", "blocks"], [0, 1, 2], STEPS)
    rows = {(r["arm"], r["baseline"]): r for r in res["verdicts"]}
    assert set(rows) == {("triton", "reference"), ("blocks", "reference"), ("blocks", "triton")}
    assert abs(rows[("blocks", "triton")]["mean_diff"] - 0.2) < 1e-9
    assert abs(rows[("triton", "reference")]["mean_diff"] - 0.01) < 1e-9


def test_reference_runs_of_other_reference_numerics_are_not_reused(tmp_path):
    """The reference path's numerics are part of the setup: runs recorded before they changed are trained again."""
    from bench_loss_parity import REFERENCE_NUMERICS, recorded_runs
    setup = {"preset": "small", "steps": STEPS, "seq": 4096, "batch": 2, "reference_numerics": REFERENCE_NUMERICS}
    run = {"finished": True, "final_val_loss": 2.0, "commit": "abc"}
    path = tmp_path / "loss_parity.json"
    path.write_text(json.dumps({"setup": {**setup, "reference_numerics": REFERENCE_NUMERICS - 1},
                                "runs": {"reference-s0": run}}))
    assert recorded_runs(str(path), setup) == {}
    path.write_text(json.dumps({"setup": setup, "runs": {"reference-s0": run}}))
    assert list(recorded_runs(str(path), setup)) == ["reference-s0"]


def test_keep_recorded_keeps_the_arms_not_asked_for(tmp_path):
    """`--keep-recorded --arms reference blocks` adds blocks runs beside the committed file's runs of every arm: the
    triton runs stay in the file and in the verdicts (a call that runs one arm loses no other arm's record)."""
    import subprocess

    from bench_loss_parity import REFERENCE_NUMERICS
    setup = {"preset": "small", "steps": 200, "seq": 4096, "batch": 2, "reference_numerics": REFERENCE_NUMERICS}
    runs = {f"{arm}-s{s}": {"finished": True, "final_val_loss": 2.0 + 0.1 * s + d, "commit": "abc"}
            for arm, d in (("reference", 0.0), ("triton", 0.01), ("blocks", 0.02)) for s in (0, 1, 2)}
    (tmp_path / "loss_parity.json").write_text(json.dumps({"setup": setup, "runs": runs}))
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_loss_parity.py"), "--arms", "reference",
                        "blocks", "--seeds", "0", "1", "--keep-recorded", "--out", str(tmp_path),
                        "--root", str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "loss_parity.json").read_text())
    assert set(res["runs"]) == set(runs) and list(res["arms"]) == ["reference", "triton", "blocks"]
    assert {(r["arm"], r["baseline"]) for r in res["verdicts"]} == {("triton", "reference"), ("blocks", "reference"),
                                                                  ("blocks", "triton")}
