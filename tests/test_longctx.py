"""Long-context quality vs length (dsv4_lab/longctx.py, dsv4_lab/figures/long_context.py)."""
import json
from pathlib import Path

import pytest
import torch

from dsv4_lab import longctx
from dsv4_lab.cli import main
from dsv4_lab.config import ConfigError, ModelConfig, parse_overrides
from dsv4_lab.data.synthetic import ORDINALS, QUERY, answer_distances, mrcr_batch
from dsv4_lab.figures.long_context import load_results, plot_committed, plot_long_context
from dsv4_lab.model import DSV4LM
from dsv4_lab.runlog import load_json


@pytest.mark.parametrize("setting", sorted(longctx.SETTINGS))
def test_every_setting_resolves_and_spans_window_to_beyond_training(setting, tmp_path):
    s = longctx.SETTINGS[setting]
    for arm in longctx.ARMS:
        mc, tc = parse_overrides(longctx.overrides(setting, arm, 0, str(tmp_path)))
        assert mc.max_seq_len >= max(s["lengths"]) and tc.data == "mrcr"
    # the arms differ in their attention layers only
    cfgs = [parse_overrides(longctx.overrides(setting, a, 0, str(tmp_path)))[0].to_dict() for a in longctx.ARMS]
    assert all({k for k in c if c[k] != cfgs[0][k]} <= {"layer_types"} for c in cfgs)
    if setting == "gpu":
        assert min(s["lengths"]) < mc.window and max(s["lengths"]) >= 4 * tc.seq_len and len(s["seeds"]) >= 3
    for n in s["lengths"]:                             # every evaluation length holds the needles and the queries
        x, y = mrcr_batch(1, n, tc.task_n_needles, seed=longctx.EVAL_SEED + n, n_queries=tc.task_mrcr_queries)
        assert int((y != -100).sum()) == 4 * tc.task_mrcr_queries


def check_rope_table_length(seed: int = 0):
    """[(name, error, tolerance)]: training with max_seq_len = the longest evaluation length is training the same
    model: RoPE tables are fixed functions of the position, so a model built for 512 positions computes what one built
    for 128 does. Tolerance: the tables' cos / sin may differ by ~1 ulp (vectorized vs scalar tails, 1.2e-7
    relative); through 4 layers of a freshly initialised fp32 model that moves the logits by ~1e-6 of their scale;
    1e-4 (relative to max|logits|) leaves 100x."""
    outs = []
    for n in (128, 512):
        torch.manual_seed(seed)
        m = DSV4LM(ModelConfig.from_preset("tiny", max_seq_len=n, window=16)).eval()
        outs.append(m(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1 + seed))).logits)
    return [("RoPE table length 128 vs 512 (rel to max|logits|)",
             ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item(), 1e-4)]


def test_rope_table_length_does_not_change_the_model():
    for what, err, tol in check_rope_table_length():
        assert err <= tol, (what, err, tol)


class Oracle(torch.nn.Module):
    """Answers an MRCR query right iff its needle is at most `see` tokens back, else emits a filler byte: its
    accuracy is 1 on near answers and 0 on far ones when see = the window."""

    def __init__(self, see):
        super().__init__()
        self.see = see

    def forward(self, x):
        logits = torch.zeros(*x.shape, 256)
        logits[..., 32] = 1.0
        for b in range(x.shape[0]):
            s = x[b].tolist()
            q = s.index(QUERY)
            ty, k = s[q + 1], s[q + 2] - ORDINALS[0]
            pos = [i for i in range(q) if s[i] == ty][k]
            if q - pos <= self.see:
                for j in range(4):                       # answer token j = needle content j, predicted at q + 2 + j
                    logits[b, q + 2 + j, s[pos + 1 + j]] = 2.0
        return type("Out", (), {"logits": logits})()


def test_evaluation_counts_near_and_far_answers():
    from contextlib import nullcontext
    x, y = mrcr_batch(16, 96, 2, seed=longctx.EVAL_SEED + 96, index=0)
    d = answer_distances(x, y)
    n_far = int(((d > 16) & (y != -100)).sum())
    assert 0 < n_far < int((y != -100).sum())                # both buckets occur at this length
    r = longctx.evaluate_length(Oracle(16), 96, 16, 2, 16, "cpu", nullcontext, 96 * 16)
    assert r["n_answers"] == r["n_answers_near"] + r["n_answers_far"] and r["n_answers_far"] == n_far
    assert r["answer_acc_near"] == 1.0 and r["answer_acc_far"] == 0.0
    assert r["answer_acc"] == pytest.approx(r["n_answers_near"] / r["n_answers"])
    full = longctx.evaluate_length(Oracle(10**9), 96, 16, 2, 16, "cpu", nullcontext, 96 * 16)
    assert full["answer_acc"] == 1.0 and full["exact_match"] == 1.0


def test_cpu_tiny_runs_resumes_and_plots(tmp_path):
    root, out = str(tmp_path / "lc"), tmp_path / "res.json"
    for arm in ("v4", "dense"):                                           # in-process (fast) ...
        longctx.run_one("cpu-tiny", arm, 0, root, log=lambda *a: None)
    # ... and the packed runner (a child process per arm x seed), which then collects every finished record
    assert main(["longctx", "run", "--setting", "cpu-tiny", "--jobs", "2", "--root", root, "--out", str(out)]) == 0
    res = load_results(out)
    s = longctx.SETTINGS["cpu-tiny"]
    assert sorted(r["arm"] for r in res["records"]) == sorted(longctx.ARMS)
    for r in res["records"]:
        assert sorted(map(int, r["lengths"])) == s["lengths"]
        for v in r["lengths"].values():
            assert v["n_answers"] == 4 * s["eval_seqs"] and 0 <= v["answer_acc"] <= 1
    # a finished record is skipped; an evaluation length lost from eval.json is redone alone, identically
    ev = Path(root) / "cpu-tiny" / "v4-s0" / "eval.json"
    metrics = (ev.parent / "metrics.jsonl").read_text()
    rec = load_json(ev)
    lost = rec["lengths"].pop("64")
    ev.write_text(json.dumps(rec))
    assert not longctx.is_done("cpu-tiny", "v4", 0, root)
    again = longctx.run_one("cpu-tiny", "v4", 0, root, log=lambda *a: None)
    assert (ev.parent / "metrics.jsonl").read_text() == metrics          # not retrained
    assert {k: v for k, v in again["lengths"]["64"].items() if k != "eval_s"} == \
        {k: v for k, v in lost.items() if k != "eval_s"}
    png = plot_long_context(out, tmp_path / "fig.png")
    assert png.stat().st_size > 10_000
    # make reproduce: drawn from the committed JSON when it is there, nothing (one line) when it is not
    assert [p.name for p in plot_committed(out, tmp_path / "figs")] == ["long_context_quality.png"]
    assert plot_committed(tmp_path / "absent.json", tmp_path / "none") == [] and not (tmp_path / "none").exists()


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"settings": {"gpu": {}}, "records": [{"setting": "gpu", "arm": "v4", "seed": 0}]}))
    with pytest.raises(ConfigError, match=r"records\[0\] lacks field 'lengths'"):
        load_results(bad)
    assert main(["longctx", "figure", "--results", str(bad), "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "lengths" in err and err.count("\n") == 1 and not (tmp_path / "f.png").exists()
    ev = tmp_path / "cpu-tiny" / "v4-s0" / "eval.json"            # a damaged evaluation record: one line, exit 2
    ev.parent.mkdir(parents=True)
    ev.write_text("{not json")
    assert main(["longctx", "collect", "--root", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "eval.json" in err and err.count("\n") == 1 and not (tmp_path / "r.json").exists()
    ev.unlink()
    assert main(["longctx", "run", "--setting", "huge", "--root", str(tmp_path)]) == 2
    assert "huge" in capsys.readouterr().err
    assert main(["longctx", "run", "--setting", "cpu-tiny", "--arms", "v4,mla", "--root", str(tmp_path)]) == 2
    assert "mla" in capsys.readouterr().err and not (tmp_path / "cpu-tiny" / "v4-s0" / "config.json").exists()


def test_comparisons_pair_seeds_and_adjust_over_every_length():
    """A clear effect at one length survives Holm over all (arm, length) pairs; noise elsewhere stays null."""
    def rec(arm, seed, accs):
        return {"setting": "s", "arm": arm, "seed": seed,
                "lengths": {str(n): {"answer_acc": a} for n, a in accs.items()}}
    base = {0: (0.50, 0.10), 1: (0.70, 0.05), 2: (0.60, 0.08)}     # seed: (acc at 64, acc at 128)
    noise = (+0.03, -0.04, +0.01)
    recs = [rec("dense", s, {64: a, 128: b}) for s, (a, b) in base.items()]
    recs += [rec("v4", s, {64: a + noise[s], 128: b + 0.5 + 0.01 * s}) for s, (a, b) in base.items()]
    rows = {r["length"]: r for r in longctx.comparisons(recs)}
    assert set(rows) == {64, 128} and all(r["arm"] == "v4" and r["n_seeds"] == 3 for r in rows.values())
    assert rows[128]["verdict"] == "better" and rows[128]["ci_low"] > 0.45
    assert rows[128]["mean_diff"] == pytest.approx(0.51)         # paired by seed: the seeds' spread cancels
    assert rows[64]["verdict"] == "null"
    assert all(r["p_holm"] >= r["p"] for r in rows.values())
    assert rows[128]["p_holm"] == pytest.approx(min(1.0, 2 * rows[128]["p"]))   # the smaller of 2 p-values: x2
