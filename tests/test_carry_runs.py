"""scripts/carry_runs.py: unfinished runs (with checkpoints) go out in bounded parts and come back whole; finished
and diverged runs stay; an existing run dir is never overwritten."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "carry_runs.py"


def _run_dir(root, name, steps, last, ckpt_bytes=0, diverged=False):
    rd = root / name
    rd.mkdir(parents=True)
    (rd / "config.json").write_text(json.dumps({"train": {"max_steps": steps}, "model": {}}))
    (rd / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(last + 1)))
    if ckpt_bytes:
        (rd / "ckpt.pt").write_bytes(os.urandom(ckpt_bytes))          # incompressible, as weights are
    if diverged:
        (rd / "diverged.json").write_text("{}")
    return rd


def _carry(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_unfinished_runs_travel_in_parts_and_come_back_whole(tmp_path):
    src = tmp_path / "runs"
    a = _run_dir(src, "s/gpu/a-s0", 100, 49, ckpt_bytes=300_000)            # unfinished: carried
    b = _run_dir(src, "s/gpu/select/b-lr0.01-s100", 100, 9, ckpt_bytes=200_000)
    _run_dir(src, "s/gpu/c-s0", 100, 99, ckpt_bytes=1000)                   # finished: not carried
    _run_dir(src, "s/gpu/d-s0", 100, 20, ckpt_bytes=1000, diverged=True)    # diverged: a result, not carried
    (a / "extra").mkdir()
    (a / "extra" / "eval.json").write_text("{}")
    r = _carry("out", src, tmp_path / "out", "--part-mib", "0.1")
    assert r.returncode == 0, r.stderr
    parts = sorted((tmp_path / "out").iterdir())
    assert len(parts) >= 5 and all(p.stat().st_size <= 0.1 * 2**20 for p in parts)
    dest = tmp_path / "next"
    _run_dir(dest, "s/gpu/select/b-lr0.01-s100", 100, 3)                    # already there: left alone
    r = _carry("in", tmp_path / "out", dest)
    assert r.returncode == 0 and "1 run dirs" in r.stdout, r.stdout + r.stderr
    for f in ("config.json", "metrics.jsonl", "ckpt.pt", "extra/eval.json"):
        assert (dest / "s/gpu/a-s0" / f).read_bytes() == (a / f).read_bytes()
    assert not (dest / "s/gpu/select/b-lr0.01-s100" / "ckpt.pt").exists()
    assert not (dest / "s/gpu/c-s0").exists() and not (dest / "s/gpu/d-s0").exists()
    assert b.exists()


@pytest.mark.parametrize("args, word", [(["out", "nowhere", "x"], "ROOT"), (["in", "nowhere", "x"], "SRC")])
def test_bad_paths_are_refused_in_one_line(tmp_path, args, word):
    r = _carry(*[a if a != "nowhere" else tmp_path / "nowhere" for a in args])
    assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1
