from pathlib import Path

import pytest

from dsv4_lab.config import parse_overrides
from dsv4_lab.sweep import load_sweep, run_sweep, sweep_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "ablations").glob("*.json")), ids=lambda p: p.stem)
def test_every_sweep_definition_resolves_to_valid_configs(path):
    sweep = load_sweep(path)
    runs = sweep_runs(sweep, "runs")
    assert runs and len({kv["run_dir"] for _, _, kv in runs}) == len(runs)
    for _, _, kv in runs:
        parse_overrides(dict(kv))
    if path.stem != "reproduce":
        assert len(sweep["seeds"]) >= 3 and "question" in sweep and "budget" in sweep


def test_sweep_skips_finished_runs(tmp_path, capsys):
    sweep = {"name": "t", "base": {"preset": "tiny", "max_steps": 3, "seq_len": 32, "batch_size": 2,
                                   "layer_types": "dense*1"}, "arms": {"a": {}}, "seeds": [0]}
    r1 = run_sweep(sweep, str(tmp_path), progress=False)
    r2 = run_sweep(sweep, str(tmp_path), progress=False)
    assert "skipped" in capsys.readouterr().out
    assert r1[0]["last"] == r2[0]["last"] and r1[0]["last"]["step"] == 2
