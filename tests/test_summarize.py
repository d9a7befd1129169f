"""summarize: run records -> summary / curves / verdicts CSVs and figures (dsv4_lab/summarize.py)."""
import csv
import json
from pathlib import Path

import numpy as np

from dsv4_lab.cli import main
from dsv4_lab.runlog import save_json
from dsv4_lab.summarize import SUMMARY_COLS, VERDICT_COLS

ROOT = Path(__file__).resolve().parents[1]
SWEEP = {"name": "toy", "question": "does b lower the loss?", "budget_type": "equal tokens", "budget": "10 steps",
         "claim_boundary": "a toy", "metric": {"name": "val_loss", "direction": "lower"},
         "secondary": [{"name": "spike_count", "direction": "lower"}], "baseline": "a", "seeds": [0, 1, 2, 3, 4],
         "base": {}, "arms": {"a": {}, "b": {}, "c": {}}}


def _fake_run(root, arm, seed, val_loss, steps=10, finished=True, scale="cpu", env=None):
    rd = root / "toy" / scale / f"{arm}-s{seed}"
    save_json({"ablation": "toy", "scale": scale, "phase": "eval", "arm": arm, "family": arm, "seed": seed}, rd / "sweep.json")
    if env is not None:
        save_json(env, rd / "env.json")
    save_json({"model": {}, "train": {"max_steps": steps}}, rd / "config.json")
    last = steps - 1 if finished else steps // 2
    recs = [{"step": s, "losses": [3.0 - 0.1 * s], "tokens": 64 * (s + 1), "flops": 1e6 * (s + 1)} for s in range(last + 1)]
    recs[-1]["val_loss"] = val_loss
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_summarize_builds_csvs_and_verdicts(tmp_path, capsys):
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "toy.json").write_text(json.dumps(SWEEP))
    rng = np.random.default_rng(0)
    for s in range(5):
        base = 2.0 + rng.normal(0, 0.3)                       # seed effect shared by the arms (paired)
        _fake_run(tmp_path / "runs", "a", s, base)
        _fake_run(tmp_path / "runs", "b", s, base - 0.2 + rng.normal(0, 0.01))
        _fake_run(tmp_path / "runs", "c", s, base + rng.normal(0, 0.01))
    _fake_run(tmp_path / "runs", "c", 9, 0.0, finished=False)  # unfinished: not a result
    out = tmp_path / "res"
    assert main(["summarize", str(tmp_path / "runs"), "--out", str(out), "--sweeps", str(tmp_path / "abl")]) == 0
    table = capsys.readouterr().out
    assert "b vs a" in table and "better" in table
    summary, verdicts = _rows(out / "summary.csv"), _rows(out / "verdicts.csv")
    assert list(summary[0]) == SUMMARY_COLS and list(verdicts[0]) == VERDICT_COLS
    assert {r["seed"] for r in summary if r["arm"] == "c"} == {"0", "1", "2", "3", "4"}
    v = {(r["arm"], r["metric"]): r for r in verdicts}
    assert v[("b", "val_loss")]["verdict"] == "better" and v[("b", "val_loss")]["n_seeds"] == "5"
    assert v[("c", "val_loss")]["verdict"] == "null"
    assert float(v[("b", "val_loss")]["ci_high"]) < 0 < float(v[("c", "val_loss")]["ci_high"])
    assert not (tmp_path / "figures").exists()                 # no figure unless asked
    assert main(["summarize", str(tmp_path / "runs"), "--out", str(out), "--sweeps", str(tmp_path / "abl"),
                 "--figures", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "ablation_toy.png").stat().st_size > 10_000


def test_summarize_bad_root_and_reproduce_typo_write_nothing(tmp_path, capsys):
    assert main(["summarize", str(tmp_path / "nope"), "--out", str(tmp_path / "res")]) == 2
    assert not (tmp_path / "res").exists()
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()}
    assert main(["reproduce", "sweeps=ablations/csa_vs_hca.json"]) == 2
    assert "sweeps" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()} == before


def test_gpu_tier_rows_carry_scale_and_gpu_name(tmp_path, capsys):
    """Both tiers in one summary: scale and device per row, verdicts per scale, one figure per tier."""
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "toy.json").write_text(json.dumps(SWEEP))
    rng = np.random.default_rng(1)
    cpu_env = {"device": "cpu", "torch_threads": 1}
    gpu_env = {"device": "cuda:0", "gpu": "NVIDIA H200", "torch_threads": 16}
    for s in range(3):
        for arm, shift in (("a", 0.0), ("b", -0.3), ("c", 0.0)):
            _fake_run(tmp_path / "runs", arm, s, 2.0 + shift + rng.normal(0, 0.01), env=cpu_env)
            _fake_run(tmp_path / "runs", arm, s, 1.5 + rng.normal(0, 0.01), scale="gpu", env=gpu_env)
    out = tmp_path / "res"
    assert main(["summarize", str(tmp_path / "runs"), "--out", str(out), "--sweeps", str(tmp_path / "abl"),
                 "--figures", str(tmp_path / "fig")]) == 0
    summary = _rows(out / "summary.csv")
    assert {(r["scale"], r["device"]) for r in summary} == {("cpu", "cpu x1"), ("gpu", "NVIDIA H200")}
    v = {(r["scale"], r["arm"], r["metric"]): r["verdict"] for r in _rows(out / "verdicts.csv")}
    assert v[("cpu", "b", "val_loss")] == "better" and v[("gpu", "b", "val_loss")] == "null"
    assert (tmp_path / "fig" / "ablation_toy.png").exists() and (tmp_path / "fig" / "ablation_toy_gpu.png").exists()


def test_metric_scales_limit_where_a_metric_is_compared(tmp_path, capsys):
    """A metric with `scales: [cpu]` (e.g. wall-clock where GPU runs shared the device in waves) gets verdicts at
    the cpu scale only; a scale name outside cpu / gpu is refused with the field named."""
    sweep = json.loads(json.dumps(SWEEP))
    sweep["secondary"] = [{"name": "time_s", "direction": "lower", "scales": ["cpu"], "why": "packed on the GPU"}]
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "toy.json").write_text(json.dumps(sweep))
    for scale in ("cpu", "gpu"):
        for s in range(3):
            for arm in ("a", "b"):
                _fake_run(tmp_path / "runs", arm, s, 2.0 + 0.1 * s, scale=scale)
                p = tmp_path / "runs" / "toy" / scale / f"{arm}-s{s}" / "metrics.jsonl"
                recs = [json.loads(x) for x in p.read_text().splitlines()]
                recs[-1]["time_s"] = 10.0 + s + (5.0 if arm == "b" else 0.0)
                p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "res"
    assert main(["summarize", str(tmp_path / "runs"), "--out", str(out), "--sweeps", str(tmp_path / "abl")]) == 0
    rows = {(r["scale"], r["metric"]) for r in _rows(out / "verdicts.csv")}
    assert ("cpu", "time_s") in rows and ("gpu", "time_s") not in rows
    assert ("gpu", "val_loss") in rows                      # the other metrics are compared at both scales
    summary = {(r["scale"], r["metric"]) for r in _rows(out / "summary.csv")}
    assert ("gpu", "time_s") in summary                     # still recorded per run, only not compared
    sweep["secondary"][0]["scales"] = ["tpu"]
    (tmp_path / "abl" / "toy.json").write_text(json.dumps(sweep))
    assert main(["summarize", str(tmp_path / "runs"), "--out", str(tmp_path / "res2"),
                 "--sweeps", str(tmp_path / "abl")]) == 2
    err = capsys.readouterr().err
    assert "secondary[0].scales" in err and "tpu" in err and not (tmp_path / "res2").exists()


def test_spike_sharing_rows_compare_arms_within_a_seed_and_seeds_within_the_baseline(tmp_path):
    """spikes_shared_with_baseline: an arm whose spikes sit at the baseline's steps on the same seed scores 1, one
    whose spikes sit elsewhere 0; spikes_shared_across_seeds: the baseline against its next seed (the control)."""
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "toy.json").write_text(json.dumps(SWEEP))
    def losses(at):                                         # flat 2.0 with one-step jumps to 3.0 at the given steps
        return [3.0 if t in at else 2.0 for t in range(60)]
    spikes = {("a", 0): {30, 45}, ("b", 0): {30, 45}, ("c", 0): {35},
              ("a", 1): {25, 50}, ("b", 1): {25}, ("c", 1): {40}}
    for (arm, seed), at in spikes.items():
        _fake_run(tmp_path / "runs", arm, seed, 2.0, steps=60)
        p = tmp_path / "runs" / "toy" / "cpu" / f"{arm}-s{seed}" / "metrics.jsonl"
        recs = [json.loads(x) for x in p.read_text().splitlines()]
        recs = [{**recs[-1], "step": 59, "losses": losses(at)}]
        p.write_text(json.dumps(recs[0]) + "\n")
    out = tmp_path / "res"
    assert main(["summarize", str(tmp_path / "runs"), "--out", str(out), "--sweeps", str(tmp_path / "abl")]) == 0
    got = {(r["arm"], r["seed"], r["metric"]): float(r["value"]) for r in _rows(out / "summary.csv")
           if r["metric"].startswith("spikes_shared")}
    assert got == {("b", "0", "spikes_shared_with_baseline"): 1.0, ("b", "1", "spikes_shared_with_baseline"): 1.0,
                   ("c", "0", "spikes_shared_with_baseline"): 0.0, ("c", "1", "spikes_shared_with_baseline"): 0.0,
                   ("a", "0", "spikes_shared_across_seeds"): 0.0, ("a", "1", "spikes_shared_across_seeds"): 0.0}


def test_a_sweep_whose_baseline_has_not_finished_still_summarizes_and_plots(tmp_path, capsys):
    """A GPU tier stopped between chunks: only non-baseline arms finished. Rows and a figure, no verdict, no crash."""
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "toy.json").write_text(json.dumps(SWEEP))
    for s in range(3):
        _fake_run(tmp_path / "runs", "b", s, 1.5 + 0.1 * s)
    _fake_run(tmp_path / "runs", "a", 0, 2.0, finished=False)          # the baseline is still training
    out, figs = tmp_path / "res", tmp_path / "figures"
    assert main(["summarize", str(tmp_path / "runs"), "--out", str(out), "--sweeps", str(tmp_path / "abl"),
                 "--figures", str(figs)]) == 0
    summary = _rows(out / "summary.csv")
    assert {r["arm"] for r in summary} == {"b"}
    assert not [r for r in _rows(out / "verdicts.csv") if r["arm"] == "b" and r["metric"] == "val_loss"]
    assert (figs / "ablation_toy.png").stat().st_size > 10_000


def test_figure_run_records_name_no_machine_path(tmp_path):
    """The records a figure carries (`<name>.runs.json`) name runs inside the repository relative to it: a figure
    regenerated by `make reproduce` on any machine can be committed (tests/test_docs.py forbids absolute paths)."""
    import json
    from pathlib import Path

    from dsv4_lab.figures.loss_curves import plot_loss_curves
    from dsv4_lab.runlog import REPO_ROOT, repo_relative, save_json
    assert repo_relative({"a": f"{REPO_ROOT}/runs/x", "b": ["/elsewhere/y", 3], "c": f"{REPO_ROOT}x"}) == \
        {"a": "runs/x", "b": ["/elsewhere/y", 3], "c": f"{REPO_ROOT}x"}
    rd = REPO_ROOT / "runs" / "_test_records" / f"r{tmp_path.name}"
    rd.mkdir(parents=True)
    try:
        save_json({"train": {"run_dir": str(rd), "seed": 0}}, rd / "config.json")
        (rd / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm_loss": 1.0, "train_loss": 1.0}) + "\n")
        plot_loss_curves([rd], tmp_path / "fig.png")
        rec = json.loads((tmp_path / "fig.runs.json").read_text())
        assert rec[rd.name]["config"]["train"]["run_dir"] == str(rd.relative_to(REPO_ROOT))
    finally:
        import shutil
        shutil.rmtree(rd.parent)
