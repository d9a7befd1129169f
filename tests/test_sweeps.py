"""The sweep runner (dsv4_lab/sweep.py): sweep files, validation of every run first, skip, kill-and-resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4_lab.cli import main
from dsv4_lab.config import parse_overrides
from dsv4_lab.metrics import step_losses
from dsv4_lab.runlog import read_metrics, save_json
from dsv4_lab.sweep import choose, is_finished, load_sweep, plan, run_sweep, selection_runs, sweep_runs

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = sorted(p for p in (ROOT / "ablations").glob("*.json") if p.stem != "reproduce")
TINY = {"preset": "tiny-dense", "max_steps": 6, "seq_len": 32, "batch_size": 2, "layer_types": "dense*1",
        "eval_interval": 3, "eval_batches": 1, "ckpt_interval": 2, "log_interval": 1}


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_states_its_question_and_validates(path, tmp_path):
    sw = load_sweep(path)
    for k in ("question", "budget_type", "budget", "metric", "baseline", "claim_boundary", "scales"):
        assert k in sw, k
    for scale in ("cpu", "gpu"):
        sel, ev = plan(sw, scale, str(tmp_path))               # every config of every arm resolves
        assert len({r["kv"]["run_dir"] for r in sel + ev}) == len(sel + ev)
        seeds = {a: {r["seed"] for r in ev if r["arm"] == a} for a in sw["arms"]}
        assert all(len(s) >= (5 if scale == "cpu" else 3) for s in seeds.values()), seeds
    if "tune" in sw:                                           # room for an interior optimum on every arm
        assert all(len(g) >= 3 for g in sw["tune"]["grid"].values())
    # confounds ruled out by construction: one schedule horizon, QK-norm and the window branch in every arm
    ev = plan(sw, "cpu", str(tmp_path))[1]
    for r in ev:
        mc, tc = parse_overrides(dict(r["kv"]))
        assert mc.qk_norm and mc.window_branch and tc.max_steps == ev[0]["max_steps"]


GPU_TIER = ("csa_vs_hca", "mhc_vs_hc", "muon_vs_adamw", "fp4_vs_fp8", "anticipatory")


def test_gpu_tier_states_its_reasoning_and_cost(tmp_path):
    """The five named sweeps' gpu scale: reasoning written, every arm without compile and with the same cuda_graph
    setting, csa_vs_hca's far answers well beyond the window and its near control inside it; run_gpu_tier.sh estimate
    computes the cost table; gpu_cost.py wave gives each sweep's packed run length."""
    for name in GPU_TIER:
        sw = load_sweep(ROOT / "ablations" / f"{name}.json")
        assert len(sw.get("gpu_reasoning", "")) > 200, name
        tcs = [parse_overrides(dict(r["kv"]))[1] for r in plan(sw, "gpu", str(tmp_path))[1]]
        assert all(tc.compile == "false" for tc in tcs) and len({tc.cuda_graph for tc in tcs}) == 1, name
    sw = load_sweep(ROOT / "ablations" / "csa_vs_hca.json")
    mc, tc = parse_overrides(dict(plan(sw, "gpu", str(tmp_path))[1][0]["kv"]))
    far_min = tc.seq_len + 1 - (1 + 2 * tc.task_n_pairs + 1 + 2 * tc.task_n_queries)   # the filler length
    assert far_min >= 8 * mc.window and 2 * (tc.task_n_near + tc.task_n_queries) <= mc.window
    p = subprocess.run(["bash", str(ROOT / "ablations" / "run_gpu_tier.sh"), "estimate"], capture_output=True,
                       text=True, env={**os.environ, "PY": sys.executable})
    assert p.returncode == 0, p.stderr
    assert all(n in p.stdout for n in GPU_TIER) and "total" in p.stdout
    cost = [sys.executable, str(ROOT / "ablations" / "gpu_cost.py"), "wave"]
    p = subprocess.run(cost + ["6", *GPU_TIER], capture_output=True, text=True)
    lengths = dict(line.split() for line in p.stdout.splitlines())
    assert p.returncode == 0 and lengths.keys() == set(GPU_TIER) and all(int(v) > 0 for v in lengths.values())
    p = subprocess.run(cost + ["0", "csa_vs_hca"], capture_output=True, text=True)
    assert p.returncode == 2 and "JOBS" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_gpu_tier_chunk_archives_records_and_a_fresh_machine_skips_them(tmp_path):
    """run_gpu_tier.sh on CPU with a 6-step sweep: the chunk archives finished runs without checkpoints plus the
    device seconds per sweep; a second machine seeded from those records has nothing left to run."""
    abl = tmp_path / "abl"
    abl.mkdir()
    sw = {"name": "t", "question": "q", "budget_type": "equal tokens", "budget": "6 steps", "claim_boundary": "-",
          "metric": {"name": "val_loss", "direction": "lower"}, "baseline": "a", "seeds": [0], "base": TINY,
          "arms": {"a": {}, "b": {"lr": 0.01}}, "scales": {"cpu": {"base": {}, "seeds": [0]},
                                                          "gpu": {"base": {}, "seeds": [0]}}}
    (abl / "t.json").write_text(json.dumps(sw))
    env = {**os.environ, "PY": sys.executable, "SWEEPS": "t", "SWEEP_DIR": str(abl), "JOBS": "2", "RUN_S": "0",
           "RUNS": str(tmp_path / "runs"), "RECORDS": str(tmp_path / "records"), "ARCHIVE": str(tmp_path / "arch")}
    script = str(ROOT / "ablations" / "run_gpu_tier.sh")
    p = subprocess.run(["bash", script, "5"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for arm in ("a", "b"):
        rec = tmp_path / "arch" / "t" / "gpu" / f"{arm}-s0"
        assert (rec / "finished.json").exists() and (rec / "metrics.jsonl").exists() and not (rec / "ckpt.pt").exists()
    rows = (next((tmp_path / "arch" / "device_seconds").glob("*.csv"))).read_text().splitlines()
    assert rows[0] == "sweep,chunk,seconds,jobs,device" and rows[1].startswith("t,")
    shutil.copytree(tmp_path / "arch", tmp_path / "records")
    before = (tmp_path / "records" / "t" / "gpu" / "a-s0" / "metrics.jsonl").read_text()
    env2 = {**{k: v for k, v in env.items() if k != "RUN_S"}, "RUNS": str(tmp_path / "runs2")}   # RUN_S=auto
    p = subprocess.run(["bash", script, "5"], env=env2, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "2 finished" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert (tmp_path / "runs2" / "t" / "gpu" / "a-s0" / "metrics.jsonl").read_text() == before


def _write(tmp_path, arms, seeds=(0, 1), base=None):
    sw = {"name": "t", "question": "q", "budget_type": "equal tokens", "budget": "6 steps", "claim_boundary": "-",
          "metric": {"name": "val_loss", "direction": "lower"}, "baseline": next(iter(arms)), "seeds": list(seeds),
          "base": {**TINY, **(base or {})}, "arms": arms}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(sw))
    return p


def test_bad_key_in_last_arm_stops_before_any_run(tmp_path, capsys):
    p = _write(tmp_path, {"a": {}, "b": {"lr": 0.01}, "c": {"n_layer": 2}})
    assert main(["sweep", str(p), "--root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "arm 'c'" in err and "n_layer" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()                   # nothing trained, nothing written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(p.read_text()), "baseline": "zz"}))
    assert main(["sweep", str(bad), "--dry-run"]) == 2 and "baseline" in capsys.readouterr().err


def test_run_dir_holding_another_config_is_refused_naming_the_field(tmp_path, capsys):
    p = _write(tmp_path, {"a": {}}, seeds=(0,))
    rd = tmp_path / "runs" / "t" / "cpu" / "a-s0"
    mc, tc = parse_overrides({**TINY, "lr": 0.5, "run_dir": str(rd)})
    rd.mkdir(parents=True)
    save_json({"model": mc.to_dict(), "train": tc.to_dict()}, rd / "config.json")
    assert main(["sweep", str(p), "--root", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "train.lr: 0.5 ->" in err and err.count("\n") == 1


def test_tune_picks_the_best_value_per_arm_on_selection_seeds(tmp_path):
    sw = load_sweep(_write(tmp_path, {"a": {}, "b": {}}))
    sw["tune"] = {"key": "lr", "grid": {"a": [0.001, 0.01, 0.1], "b": [0.001, 0.01, 0.1]}, "seeds": [100, 101]}
    runs = selection_runs(sw, "cpu", str(tmp_path / "runs"))
    assert len(runs) == 12 and all("select" in r["kv"]["run_dir"] for r in runs)
    loss = {("a", 0.001): 3.0, ("a", 0.01): 2.0, ("a", 0.1): 2.5, ("b", 0.001): 2.2, ("b", 0.01): 2.4, ("b", 0.1): 9}
    for r in runs:
        rd = Path(r["kv"]["run_dir"])
        rd.mkdir(parents=True)
        (rd / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": loss[(r["family"], r["kv"]["lr"])]}))
    assert choose(sw, runs) == {"a": 0.01, "b": 0.001}


def _state(run_dirs, max_steps=TINY["max_steps"]):
    return {rd: (rd / "run.ipynb").stat().st_mtime_ns for rd in run_dirs if is_finished(rd, max_steps)}


def test_killed_sweep_resumes_with_nothing_lost_or_run_twice(tmp_path):
    # runs long enough (60 steps) that one is always mid-flight for a while when the previous has finished: with 6
    # steps a run could start and finish between two polls, and the sweep then ended before it could be killed
    steps = 60
    p = _write(tmp_path, {"a": {}, "b": {"lr": 0.01}}, seeds=(0, 1), base={"max_steps": steps})
    root = tmp_path / "runs"
    dirs = [Path(kv["run_dir"]) for _, _, kv in sweep_runs(load_sweep(p), str(root))]
    cmd = [sys.executable, "-m", "dsv4_lab", "sweep", str(p), "--root", str(root)]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill the whole process group (runner, papermill, kernel) once a run has finished and the next has started
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            done = _state(dirs, steps)
            if done and any(read_metrics(d) and d not in done for d in dirs):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = _state(dirs, steps)
    assert 0 < len(before) < len(dirs)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(is_finished(d, steps) for d in dirs)
    after = _state(dirs, steps)
    assert all(after[d] == before[d] for d in before)          # finished runs were not run again
    for d in dirs:                                             # one record per logged step, every step's loss once
        recs = read_metrics(d)
        assert [x["step"] for x in recs] == list(range(steps))
        assert len(step_losses(recs)) == steps
        assert json.loads((d / "sweep.json").read_text())["arm"] in ("a", "b")


def test_in_process_sweep_skips_finished_runs(tmp_path, capsys):
    sw = load_sweep(_write(tmp_path, {"a": {}}, seeds=(0,), base={"max_steps": 3}))
    r1 = run_sweep(sw, str(tmp_path), progress=False)
    r2 = run_sweep(sw, str(tmp_path), progress=False)
    assert "skipped" in capsys.readouterr().out
    assert r1[0]["last"] == r2[0]["last"] and r1[0]["last"]["step"] == 2
