"""Every bad input of issue 12 part 4 ends in one line `error: ...` on stderr naming the field or file, exit code 2,
no traceback and nothing half-written; checkpoints are written atomically with a sha256 and loaded without
unpickling code. The CLI runs in-process (`dsv4_lab.cli.main`); two cases also run as real subprocesses."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4_lab import cli
from dsv4_lab.runlog import MetricsLog, RunError, load_checkpoint, read_metrics, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["preset=tiny-dense", "progress=false", "seq_len=32", "batch_size=2", "eval_batches=1", "log_interval=1",
        "max_steps=3", "eval_interval=3"]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of one in-process CLI call."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, *needles):
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out.strip() == "", (out, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def files_of(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 3-step run, copied by each test that damages it."""
    rd = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *FAST, f"run_dir={rd}"]) == 0
    return rd


@pytest.fixture
def run_copy(finished, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(finished, rd)
    return rd


# ---------------------------------------------------------------------------------------------------------------
# bad input that exited 0 and did the wrong thing
# ---------------------------------------------------------------------------------------------------------------

def test_finished_run_is_skipped_with_its_final_record(capsys, run_copy):
    before = files_of(run_copy)
    rc, out, err = run_cli(capsys, "train", *FAST, f"run_dir={run_copy}")
    assert rc == 0 and json.loads(out)["step"] == 2 and files_of(run_copy) == before


def test_missing_config_json_refuses_to_resume(capsys, run_copy):
    (run_copy / "config.json").unlink()
    before = files_of(run_copy)
    line = assert_one_line_error(*run_cli(capsys, "train", *FAST, "lr=1e-2", f"run_dir={run_copy}"), "config.json")
    assert "no config.json" in line and files_of(run_copy) == before            # not resumed, nothing rewritten


def test_metrics_last_line_cut_on_finished_run_is_reported_not_step0(capsys, run_copy):
    m = run_copy / "metrics.jsonl"
    m.write_bytes(m.read_bytes()[:-40])                                          # cut inside the final record
    rc, out, err = run_cli(capsys, "train", *FAST, f"run_dir={run_copy}")
    line = assert_one_line_error(rc, out, err, "metrics.jsonl", "final step 2")
    assert "warning: " in err and "dropped its last line" in err and '"step": 0' not in out


def test_finished_run_without_checkpoint_is_not_retrained(capsys, run_copy):
    (run_copy / "ckpt.pt").unlink()                       # a sweep's committed record: finished.json, no ckpt.pt
    (run_copy / "finished.json").write_text("{}")
    before = files_of(run_copy)
    rc, out, err = run_cli(capsys, "train", *FAST, f"run_dir={run_copy}")
    assert rc == 0 and json.loads(out)["step"] == 2 and files_of(run_copy) == before
    (run_copy / "metrics.jsonl").write_text("")
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={run_copy}"), "metrics.jsonl")


def test_empty_metrics_file_never_prints_empty_result(capsys, run_copy):
    (run_copy / "metrics.jsonl").write_text("")
    rc, out, err = run_cli(capsys, "train", *FAST, f"run_dir={run_copy}")
    assert_one_line_error(rc, out, err, "metrics.jsonl", "holds no record")
    assert "{}" not in out


def test_empty_run_dir_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_cli(capsys, "train", *FAST, "run_dir="), "run_dir")
    assert_one_line_error(*run_cli(capsys, "train", *FAST, "run_dir=  "), "run_dir")
    assert list(tmp_path.iterdir()) == []


def test_reproduce_argument_typo_and_unknown_keys(capsys):
    assert_one_line_error(*run_cli(capsys, "reproduce", "sweeps=ablations/reproduce.json"), "'sweeps'", "root",
                          "sweep", "figures")
    assert_one_line_error(*run_cli(capsys, "reproduce", "rooot=runs"), "'rooot'")
    assert_one_line_error(*run_cli(capsys, "reproduce", "runs"), "key=value")
    assert_one_line_error(*run_cli(capsys, "reproduce", "sweep=/nonexistent/sweep.json"), "no such file")


# ---------------------------------------------------------------------------------------------------------------
# HF interop: YaRN attention factor
# ---------------------------------------------------------------------------------------------------------------

def _hf_config(rope_parameters):
    transformers = pytest.importorskip("transformers")
    S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
    return transformers.DeepseekV4Config(
        vocab_size=100, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, qk_rope_head_dim=16, q_lora_rank=32, num_experts_per_tok=2,
        n_routed_experts=8, n_shared_experts=1, routed_scaling_factor=1.5, max_position_embeddings=128,
        layer_types=[S, C, H], mlp_layer_types=["hash_moe", "moe", "moe"], compress_rates={C: 4, H: 8},
        hc_mult=4, sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=32, index_topk=3,
        num_nextn_predict_layers=0, use_cache=False, rope_parameters=rope_parameters)


YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0}


def _nested(**compress_extra):
    return {"main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "compress": {**YARN, "rope_theta": 160000.0, "partial_rotary_factor": 0.5, **compress_extra}}


def test_from_hf_refuses_yarn_attention_factor_not_one():
    from dsv4_lab.config import ConfigError
    from dsv4_lab.interop import config_from_hf, hf_attention_factor
    hc = _hf_config(_nested())                             # nested form without the key: HF derives 0.1 ln 16 + 1
    assert hf_attention_factor(hc, "compress") == pytest.approx(0.1 * torch.log(torch.tensor(16.0)).item() + 1)
    with pytest.raises(ConfigError, match="attention_factor = 1.27726"):
        config_from_hf(hc)
    with pytest.raises(ConfigError, match="attention_factor"):
        config_from_hf(_hf_config(_nested(attention_factor=2.0)))
    for rp in (_nested(attention_factor=1.0), YARN):       # explicit 1.0, and the flat form (HF injects 1.0)
        hc = _hf_config(rp)
        assert hf_attention_factor(hc, "compress") == 1.0
        cfg = config_from_hf(hc)
        assert cfg.yarn_factor == 16.0 and cfg.compress_rope_theta == 160000.0 and cfg.rope_theta == 10000.0


# ---------------------------------------------------------------------------------------------------------------
# loading runs is safe: no unpickling of code
# ---------------------------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("with_header", [False, True])
def test_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path, capsys, run_copy, with_header):
    marker = tmp_path / "code_ran"
    buf = io.BytesIO()
    torch.save({"model": {}, "step": 0, "evil": _Payload(str(marker))}, buf)
    if with_header:
        import hashlib
        p = buf.getvalue()
        data = b"DSV4LAB-CKPT 1 sha256=%s bytes=%d\n" % (hashlib.sha256(p).hexdigest().encode(), len(p)) + p
    else:
        data = buf.getvalue()                              # a plain torch.save, as an older dsv4-lab wrote
    (run_copy / "ckpt.pt").write_bytes(data)
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={run_copy}"), "ckpt.pt", "loaded weights-only")
    with pytest.raises(RunError, match="loaded weights-only"):
        load_checkpoint(run_copy / "ckpt.pt")
    assert not marker.exists()


def test_reproduce_loads_checkpoints_through_the_safe_loader():
    src = (ROOT / "dsv4_lab" / "reproduce.py").read_text() + (ROOT / "dsv4_lab" / "train.py").read_text()
    assert "weights_only=False" not in src and "torch.load(" not in src


def test_checkpoint_written_atomically_with_checksum(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, p)
    assert p.read_bytes().startswith(b"DSV4LAB-CKPT 1 sha256=")
    assert load_checkpoint(p)["step"] == 1
    good = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, p)
    assert p.read_bytes() == good and [q.name for q in tmp_path.iterdir()] == ["ckpt.pt"]   # no temp file left


# ---------------------------------------------------------------------------------------------------------------
# bad input that ended in a raw traceback
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("max_steps=inf", "max_steps"), ("max_steps=1e400", "max_steps"), ("vocab_size=100", "vocab_size"),
    ("lr=1e6", "'lr'"), ("lr=nan", "'lr'"), ("seq_len=abc", "seq_len"), ("seq_len=1000", "max_seq_len = 512"),
    ("max_stepz=3", "max_stepz"), ("progress=maybe", "progress"), ("data=wiki", "data"),
    ("data=retrieval task_n_pairs=12", "too short"),      # seq_len=32 is too short for the task: caught up front
])
def test_bad_config_values_fail_before_anything_is_written(capsys, tmp_path, override, needle):
    rd = tmp_path / "run"
    assert_one_line_error(*run_cli(capsys, "train", *FAST, *override.split(), f"run_dir={rd}"), needle)
    assert not rd.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=cuda is valid where a GPU exists")
def test_device_cuda_without_gpu(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", *FAST, "device=cuda", f"run_dir={tmp_path / 'r'}"), "device")
    assert not (tmp_path / "r").exists()


def test_refused_seq_len_does_not_block_the_corrected_rerun(capsys, tmp_path):
    rd = tmp_path / "run"
    assert_one_line_error(*run_cli(capsys, "train", *FAST, "seq_len=1000", f"run_dir={rd}"), "seq_len")
    rc, out, err = run_cli(capsys, "train", *FAST, f"run_dir={rd}")
    assert rc == 0 and json.loads(out)["step"] == 2


@pytest.mark.parametrize("damage, needle", [
    (lambda b: b"garbage" * 10, "ckpt.pt"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:], "sha256"),
    (lambda b: b"", "ckpt.pt"),
])
def test_damaged_checkpoint_is_named(capsys, run_copy, damage, needle):
    ck = run_copy / "ckpt.pt"
    ck.write_bytes(damage(ck.read_bytes()))
    before = files_of(run_copy)
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={run_copy}"), "ckpt.pt", needle)
    assert files_of(run_copy) == before


def test_checkpoint_of_another_config_is_named(capsys, tmp_path, run_copy):
    other = tmp_path / "other"
    assert cli.main(["train", *FAST, "lr=1e-2", f"run_dir={other}"]) == 0
    capsys.readouterr()
    shutil.copy(other / "ckpt.pt", run_copy / "ckpt.pt")
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={run_copy}"), "ckpt.pt",
                          "another configuration", "train.lr")
    # a headerless (older) checkpoint of another model shape: named as not fitting
    ck = load_checkpoint(other / "ckpt.pt")
    ck["model"] = {k: torch.zeros(1) for k in ck["model"]}
    del ck["config"]
    torch.save(ck, run_copy / "ckpt.pt")
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={run_copy}"), "ckpt.pt", "does not fit")


@pytest.mark.parametrize("text, needle", [("{not json", "cannot be read as JSON"), ("[1, 2]", "not a dsv4-lab run"),
                                          ('{"model": {}}', "not a dsv4-lab run")])
def test_corrupt_config_json_is_named(capsys, run_copy, text, needle):
    (run_copy / "config.json").write_text(text)
    before = files_of(run_copy)
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={run_copy}"), "config.json", needle)
    assert files_of(run_copy) == before


def test_run_dir_that_is_a_file_or_unwritable(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={f}"), "not a directory")
    assert_one_line_error(*run_cli(capsys, "train", *FAST, f"run_dir={f}/sub"), "is a file")
    assert_one_line_error(*run_cli(capsys, "train", *FAST, "run_dir=/proc/dsv4_lab_no_such_dir"), "run_dir")
    assert f.read_text() == "x"


def test_metrics_repair_on_resume_and_damage_reported(capsys, tmp_path, monkeypatch):
    rd = tmp_path / "run"
    import dsv4_lab.data as data
    orig = data.Batches.train_batch

    def crash(self, step):
        if step == 2:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, step)
    monkeypatch.setattr(data.Batches, "train_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", *FAST, "ckpt_interval=1", f"run_dir={rd}"])
    monkeypatch.setattr(data.Batches, "train_batch", orig)
    with open(rd / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "train_lo')                 # a record cut by the kill
    capsys.readouterr()
    rc, out, err = run_cli(capsys, "train", *FAST, "ckpt_interval=1", f"run_dir={rd}")
    assert rc == 0 and "dropped its last line" in err and json.loads(out)["step"] == 2
    assert [r["step"] for r in read_metrics(rd)] == [0, 1, 2]
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    (rd / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(RunError, match="line 2 is not a metrics record"):
        MetricsLog(rd / "metrics.jsonl").read()


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(capsys, tmp_path, monkeypatch):
    from dsv4_lab.model import DSV4LM
    orig = DSV4LM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = orig(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:                            # the third training step (step 2)
                out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(DSV4LM, "forward", poisoned)
    rd = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", *FAST, "max_steps=6", "ckpt_interval=2", f"run_dir={rd}")
    assert_one_line_error(rc, out, err, "nan at step 2", "last good checkpoint (step 1)")
    ck = load_checkpoint(rd / "ckpt.pt")
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert max(r["step"] for r in read_metrics(rd)) == 1


# ---------------------------------------------------------------------------------------------------------------
# progress bar, CLI error handling
# ---------------------------------------------------------------------------------------------------------------

def test_progress_off_never_imports_tqdm_and_on_does_not_warn(capsys, tmp_path, monkeypatch):
    import warnings

    from dsv4_lab.train import progress_bar
    monkeypatch.setitem(sys.modules, "tqdm", None)         # any `import tqdm...` now fails
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    rc, out, err = run_cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}")
    assert rc == 0, err
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "ipywidgets", None)   # as in a Jupyter without ipywidgets
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress_bar(True, 3, 0, "x")
        bar.update(1)
        bar.close()
    assert type(bar).__module__ == "tqdm.std"


def test_figures_needs_an_existing_runs_dir(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "figures", str(tmp_path / "nope")), "figures", "nope")
    assert_one_line_error(*run_cli(capsys, "figures", str(tmp_path), "extra"), "figures")


def test_unexpected_bug_still_tracebacks(monkeypatch, tmp_path):
    import dsv4_lab.train as train_mod

    def bug(mc, tc):
        raise ZeroDivisionError("a real bug")
    monkeypatch.setattr(train_mod, "train", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", *FAST, f"run_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("argv", [["train", "preset=tiny", "max_steps=inf"], ["reproduce", "sweeps=x.json"]])
def test_subprocess_exit_code_and_single_line(argv):
    r = subprocess.run([sys.executable, "-m", "dsv4_lab", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "Traceback"))]
    assert r.returncode == 2 and lines == [lines[0]] and lines[0].startswith("error: ") and r.stdout == "", r.stderr
