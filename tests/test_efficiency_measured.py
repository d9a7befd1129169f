"""Measured efficiency curves: the figure from a synthetic JSON (dsv4_lab/figures/efficiency_measured.py) and the
benchmark's CPU smoke run (benchmarks/bench_efficiency.py --device cpu --tiny), with its resume and budget."""
import csv
import json
import os
import sys
from pathlib import Path

import pytest

from dsv4_lab import accounting as acc
from dsv4_lab.config import ModelConfig
from dsv4_lab.figures.efficiency_measured import MeasuredError, load_measured, plot_efficiency_measured

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_efficiency  # noqa: E402

CTX = (64, 128)


def _synthetic() -> dict:
    """Every measurement kind for both arms at two contexts, plus one failed point; values picked so the ratios
    the CSV must report are known exactly."""
    cfgs = {"v4": ModelConfig.from_preset("tiny"), "dense": ModelConfig.from_preset("tiny-dense")}
    tps = {"v4": 1000.0, "dense": 4000.0}                      # V4 / dense time per token = 4
    pts = {}
    for arm, cfg in cfgs.items():
        for n in CTX:
            k = lambda kind: f"{arm}/{kind}/{n}"                               # noqa: E731
            pts[k("train")] = {"status": "ok", "tokens_per_s": tps[arm], "peak_mem_gb": 1.5, "mode": "eager"}
            pts[k("forward")] = {"status": "ok", "forward_s": n / (3 * tps[arm])}
            pts[k("prefill")] = {"status": "ok", "prefill_s": n / tps[arm]}
            pts[k("decode")] = {"status": "ok", "ms_per_token": 2.0 if arm == "v4" else 1.0,
                                "cache_fill": "prefill" if n == CTX[0] else "synthetic"}
            b = acc.kv_cache_bytes(cfg, n, "fp32", include_state=True)
            pts[k("kv")] = {"status": "ok", "storage": "fp32", "bytes_tensors": b + 512, "bytes_nbytes": b,
                            "capacity_tokens": n}
            pts[k("kv_paper")] = {"status": "ok", "storage": "paper", "capacity_tokens": n,
                                  "bytes_tensors": acc.kv_cache_bytes(cfg, n, "paper", include_state=True)}
    pts["dense/train/256"] = {"status": "error", "error": "OutOfMemoryError: test"}
    return {"format": 1, "settings": {"device": "cpu", "arms": {"v4": "tiny", "dense": "tiny-dense"}},
            "configs": {a: c.to_dict() for a, c in cfgs.items()}, "points": pts,
            "env": {"torch": "x", "commit": "abc"}}


def test_figure_from_synthetic_json(tmp_path):
    src = tmp_path / "m.json"
    src.write_text(json.dumps(_synthetic()))
    made = plot_efficiency_measured(src, tmp_path / "fig")
    assert [p.name for p in made] == ["efficiency_measured.png", "efficiency_measured.csv", "efficiency_measured.md"]
    assert all(p.stat().st_size > 0 for p in made)
    rows = list(csv.DictReader(open(made[1])))
    cfg_v4, cfg_d = ModelConfig.from_preset("tiny"), ModelConfig.from_preset("tiny-dense")
    for n in CTX:
        r = {row["kind"]: row for row in rows if row["row"] == "v4/dense" and int(row["ctx"]) == n}
        assert set(r) == {"train", "forward", "prefill", "decode"}
        for kind in ("train", "forward", "prefill"):
            assert float(r[kind]["measured"]) == pytest.approx(4.0, rel=1e-5)          # 4000 / 1000 tok/s
        assert float(r["decode"]["measured"]) == pytest.approx(2.0, rel=1e-5)          # 2 ms / 1 ms
        fl = lambda cfg: acc.prefill_flops(cfg, n, "plain")                            # noqa: E731
        assert float(r["train"]["analytic"]) == pytest.approx(fl(cfg_v4) / fl(cfg_d), rel=1e-5)
        dec = acc.decode_flops(cfg_v4, n, "plain") / acc.decode_flops(cfg_d, n, "plain")
        assert float(r["decode"]["analytic"]) == pytest.approx(dec, rel=1e-5)
        assert float(r["decode"]["measured_over_analytic"]) == pytest.approx(2.0 / dec, rel=1e-5)
        for arm, cfg in (("v4", cfg_v4), ("dense", cfg_d)):
            kv = next(row for row in rows if row["row"] == "kv" and row["arm"] == arm and int(row["ctx"]) == n)
            b = acc.kv_cache_bytes(cfg, n, "fp32", include_state=True)
            assert int(float(kv["analytic"])) == b and float(kv["measured_over_analytic"]) == pytest.approx(
                (b + 512) / b, rel=1e-5)
            kvp = next(row for row in rows if row["kind"] == "kv_paper" and row["arm"] == arm and int(row["ctx"]) == n)
            assert float(kvp["measured_over_analytic"]) == 1.0
            cost = next(row for row in rows if row["row"] == "cost" and row["arm"] == arm and row["kind"] == "train"
                        and int(row["ctx"]) == n)
            assert float(cost["achieved_tflops"]) == pytest.approx(
                3 * fl(cfg) / n * (4000.0 if arm == "dense" else 1000.0) / 1e12, rel=1e-5)
    md = made[2].read_text()
    assert "dense train 256: OutOfMemoryError: test" in md and "Where measurement and accounting differ" in md


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("points"), "points"),
    (lambda d: d.update(format=7), "format"),
    (lambda d: d["configs"].pop("dense"), "configs.dense"),
    (lambda d: d["configs"]["v4"].update(d_model=-1), "configs.v4"),
    (lambda d: d["points"].update({"v4/bogus/64": {"status": "ok"}}), "v4/bogus/64"),
    (lambda d: d["points"]["v4/train/64"].update(status="fine"), "points['v4/train/64'].status"),
    (lambda d: d["points"]["v4/train/64"].update(tokens_per_s=-3), "points['v4/train/64'].tokens_per_s"),
    (lambda d: d["points"]["dense/decode/64"].pop("ms_per_token"), "points['dense/decode/64'].ms_per_token"),
    (lambda d: d["points"]["v4/decode/64"].update(cache_fill="magic"), "points['v4/decode/64'].cache_fill"),
    (lambda d: d["points"]["v4/kv/64"].update(storage="fp8"), "points['v4/kv/64'].storage"),
])
def test_bad_json_one_line_error(tmp_path, edit, field):
    d = _synthetic()
    edit(d)
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(d))
    with pytest.raises(MeasuredError) as e:
        plot_efficiency_measured(src, tmp_path / "fig")
    msg = str(e.value)
    assert "\n" not in msg and str(src) in msg and field in msg
    assert not (tmp_path / "fig" / "efficiency_measured.png").exists()            # nothing half-written


def test_unreadable_and_absent_json(tmp_path, capsys):
    src = tmp_path / "cut.json"
    src.write_text(json.dumps(_synthetic())[:100])
    with pytest.raises(MeasuredError, match="cannot be read as JSON"):
        load_measured(src)
    assert plot_efficiency_measured(tmp_path / "absent.json", tmp_path / "fig") == []
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "absent.json not found" in out
    assert not (tmp_path / "fig").exists()


def test_bench_cpu_tiny_point_resume_and_budget(tmp_path, capsys):
    """One real point on CPU (tiny-dense decode at 32 tokens on a synthetically filled cache, in a child process);
    a rerun skips it, --budget 0 starts nothing new, other settings on the same file are refused."""
    out = tmp_path / "eff.json"
    base = ["--device", "cpu", "--tiny", "--arms", "dense", "--kinds", "decode", "--out", str(out), "--commit", "t"]
    assert bench_efficiency.main(base + ["--ctx-decode", "32"]) == 0
    d = json.loads(out.read_text())
    assert d["points"].keys() == {"dense/decode/32"}
    p = d["points"]["dense/decode/32"]
    assert p["status"] == "ok", p
    assert p["cache_fill"] == "synthetic" and p["ms_per_token"] > 0 and len(p["ms_all"]) == 3
    assert p["capacity_tokens"] == 32 + 1 + 3 + 1 and p["bytes_tensors"] >= p["bytes_nbytes"] > 0
    assert d["env"]["commit"] == "t" and d["settings"]["storage"] == "fp32"
    m = load_measured(out)                                                       # the figure's schema holds
    assert [q["kind"] for q in m["points"]] == ["decode"]
    capsys.readouterr()

    assert bench_efficiency.main(base + ["--ctx-decode", "32", "64", "--budget", "0"]) == 0
    log = capsys.readouterr().out
    assert "1 of 2 points already measured" in log and "budget: skipping dense/decode/64" in log
    assert json.loads(out.read_text())["points"].keys() == {"dense/decode/32"}
    assert (tmp_path / "eff.log").read_text().count("budget: skipping") == 1

    assert bench_efficiency.main(base + ["--ctx-decode", "32", "--storage", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "settings.storage" in err and str(out) in err
    assert json.loads(out.read_text())["points"]["dense/decode/32"] == p          # untouched

    d["configs"]["dense"]["d_ff"] += 1                                           # the preset changed since then
    out.write_text(json.dumps(d))
    assert bench_efficiency.main(base + ["--ctx-decode", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "configs.dense.d_ff" in err and "--fresh" in err


def test_bench_remeasure_takes_points_of_another_commit_again(tmp_path, capsys):
    """--remeasure KIND: a point measured at another commit is measured again (the old one kept under
    'superseded'); a second call at the same commit skips it (resumable across device calls)."""
    out = tmp_path / "eff.json"
    base = ["--device", "cpu", "--tiny", "--arms", "dense", "--kinds", "decode", "--out", str(out), "--ctx-decode", "32"]
    assert bench_efficiency.main(base + ["--commit", "old"]) == 0
    first = json.loads(out.read_text())["points"]["dense/decode/32"]
    assert first["commit"] == "old"
    assert bench_efficiency.main(base + ["--commit", "new", "--remeasure", "decode"]) == 0
    d = json.loads(out.read_text())
    assert d["points"]["dense/decode/32"]["commit"] == "new" and d["superseded"]["dense/decode/32"] == first
    capsys.readouterr()
    assert bench_efficiency.main(base + ["--commit", "new", "--remeasure", "decode"]) == 0
    assert "1 of 1 points already measured" in capsys.readouterr().out
    assert json.loads(out.read_text())["points"] == d["points"]


def test_bench_bad_arguments(capsys):
    for args, what in ((["--train-mode", "v4=fast"], "--train-mode"), (["--ctx-kv", "0"], "--ctx-kv"),
                       (["--steps", "0"], "--steps"), (["--device", "cpu"], "--tiny")):
        assert bench_efficiency.main(args + ["--out", os.devnull]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and what in err
