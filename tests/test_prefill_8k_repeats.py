"""benchmarks/prefill_8k_repeats.py on the CPU: one sample per csa.json, the spread per group and over all, groups
whose chain was another form kept out of the chain statistics, and bad arguments refused before anything is written;
and what benchmarks/run_all.py's summary takes from it and from each record's card."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import prefill_8k_repeats as rep  # noqa: E402


def _csa(path, parts_ms, chain_ms, graph_ms, sdpa_ms=1.0, host_ms=0.5, queued_ms=None):
    rec = {"env": {"gpu": "card", "time": "t", "code_tree": "abc"},
           "csa_prefill": {"triton_8192": {"ms": parts_ms, "compressor_ms": 0.1, "indexer_ms": 0.1,
                                           "indexer_method": "rowsel_bf16", "sparse_ms": parts_ms - 0.2,
                                           "sdpa_flash_ms": sdpa_ms, "speedup_vs_sdpa_flash": sdpa_ms / parts_ms},
                           "pipeline_8192": {"method": "rowsel_bf16", "ms": chain_ms, "graph_ms": graph_ms,
                                             "host": {"ms": host_ms},
                                             "speedup_vs_sdpa_flash": sdpa_ms / chain_ms,
                                             "graph_speedup_vs_sdpa_flash": sdpa_ms / graph_ms}}}
    if queued_ms is not None:                                   # records since bench_queued; older ones have none
        rec["csa_prefill"]["pipeline_8192"].update(queued={"ms": queued_ms, "held": True},
                                                   sdpa_flash_queued={"ms": sdpa_ms, "held": True},
                                                   queued_speedup_vs_sdpa_flash=sdpa_ms / queued_ms)
    path.write_text(json.dumps(rec))
    return str(path)


def test_spread_per_group_and_over_all(tmp_path):
    a = [_csa(tmp_path / f"a{i}.json", ms, 1.25, 0.8) for i, ms in enumerate((0.5, 2.0, 1.0))]   # 2x, 0.5x, 1x
    b = [_csa(tmp_path / f"b{i}.json", ms, 0.5, 0.4, queued_ms=q)                               # 1.25x, 2.5x
         for i, (ms, q) in enumerate(((0.8, 0.5), (0.4, None)))]
    out = tmp_path / "rep.json"
    assert rep.main(["--out", str(out), "--parts-only", "old"] + [f"old={p}" for p in a] + [f"new={p}" for p in b]) == 0
    r = json.loads(out.read_text())
    parts = r["stats"]["by_parts_speedup"]
    assert parts["all"] == {"n": 5, "median": 1.25, "min": 0.5, "max": 2.5, "below_1": 1}
    assert parts["old"] == {"n": 3, "median": 1.0, "min": 0.5, "max": 2.0, "below_1": 1}
    assert parts["new"]["n"] == 2 and parts["new"]["median"] == (1.25 + 2.5) / 2
    # the old group's chain (0.8x eager) is kept per sample but counts in no chain statistic
    assert r["stats"]["chain_speedup"]["old"] is None
    assert r["stats"]["chain_speedup"]["all"] == {"n": 2, "median": 2.0, "min": 2.0, "max": 2.0, "below_1": 0}
    assert r["samples"][0]["chain_speedup"] is None and r["samples"][0]["other_chain"]["chain_speedup"] == 0.8
    assert "below_1" not in r["stats"]["chain_host_ms"]["all"]
    # queued: only the one record that has it counts
    assert r["stats"]["chain_queued_speedup"]["all"] == {"n": 1, "median": 2.0, "min": 2.0, "max": 2.0, "below_1": 0}
    assert r["samples"][3]["chain_queued_ms"] == 0.5 and r["samples"][4]["chain_queued_ms"] is None
    assert r["samples"][3]["chain_queued_held"] is True and r["samples"][4]["chain_queued_held"] is None


def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys):
    p = _csa(tmp_path / "a.json", 0.5, 0.6, 0.4)
    out = tmp_path / "rep.json"
    assert rep.main(["--out", str(out), f"a{p}"]) == 2                                  # no GROUP=
    assert rep.main(["--out", str(out), f"a={tmp_path / 'missing.json'}"]) == 2
    assert rep.main(["--out", str(out), "--parts-only", "zzz", f"a={p}"]) == 2
    (tmp_path / "empty.json").write_text("{}")
    assert rep.main(["--out", str(out), f"a={tmp_path / 'empty.json'}"]) == 2           # no 8K record in it
    assert not out.exists() and not Path(str(out) + ".tmp").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("prefill_8k_repeats: ") for line in err)
    assert str(tmp_path / "empty.json") in err[-1]                                    # the error names the file


def test_summary_names_each_records_card_and_carries_the_8k_spread(tmp_path, monkeypatch):
    """run_all --summary-only: records of two cards make `gpu` "mixed" and `cards` name each; the 8K repeats' spread
    comes over whole, beside the single record's key, which stays the record's own figure."""
    import run_all
    csa = json.loads(Path(_csa(tmp_path / "csa.json", 0.5, 0.6, 0.4)).read_text())
    csa["env"]["gpu"], csa["dense"] = "card B", {"sdpa_flash_8192": {"ms": 1.0}}
    (tmp_path / "csa.json").write_text(json.dumps(csa))
    (tmp_path / "hca.json").write_text(json.dumps({"env": {"gpu": "card A"}}))
    monkeypatch.setattr(run_all, "RESULTS", str(tmp_path))
    s = run_all.build_summary()
    assert s["cards"] == {"hca": "card A", "csa": "card B"} and s["gpu"] == "mixed: see cards"
    assert "csa_prefill_8k_repeats" not in s and s["csa_prefill_8k_speedup_vs_sdpa_flash"] == 2.0
    assert s["csa_prefill_8k_pipeline"]["queued_ms"] is None                # a record from before bench_queued
    assert s["csa_prefill_8k_pipeline"]["graph_speedup_vs_sdpa_flash"] == 2.5
    assert rep.main(["--out", str(tmp_path / "csa_8k_repeats.json"), f"m={tmp_path / 'csa.json'}"]) == 0
    s = run_all.build_summary()
    assert s["csa_prefill_8k_repeats"]["stats"]["by_parts_speedup"]["all"]["median"] == 2.0
    assert json.loads((tmp_path / "summary.json").read_text())["cards"]["csa"] == "card B"
    (tmp_path / "hca.json").unlink()
    assert run_all.build_summary()["gpu"] == "card B"


def test_with_record_keeps_earlier_samples_first(tmp_path, capsys):
    """--with-record: an earlier record's samples (from before bench_queued: no queued keys; one group parts-only)
    come first as they were, the statistics cover old and new, and a file that is not such a record exits 2."""
    old = [_csa(tmp_path / "o.json", 0.5, 2.0, 0.4)]                                       # 2x by parts, 0.5x chain
    first = tmp_path / "first.json"
    assert rep.main(["--out", str(first), "--parts-only", "old", f"old={old[0]}"]) == 0
    rec = json.loads(first.read_text())
    for s in rec["samples"]:
        s.pop("chain_queued_ms"), s.pop("chain_queued_speedup")
    first.write_text(json.dumps(rec))
    new = _csa(tmp_path / "n.json", 1.0, 0.8, 0.5, queued_ms=0.5)                          # 1x, 1.25x, 2x queued
    out = tmp_path / "both.json"
    assert rep.main(["--out", str(out), "--with-record", str(first), f"new={new}"]) == 0
    r = json.loads(out.read_text())
    assert [s["group"] for s in r["samples"]] == ["old", "new"] and r["parts_only"] == ["old"]
    assert r["samples"][0]["other_chain"]["chain_speedup"] == 0.5
    assert r["stats"]["by_parts_speedup"]["all"] == {"n": 2, "median": 1.5, "min": 1.0, "max": 2.0, "below_1": 0}
    assert r["stats"]["chain_speedup"]["all"]["n"] == 1 and r["stats"]["chain_queued_speedup"]["all"]["min"] == 2.0
    (tmp_path / "bad.json").write_text("[1]")
    assert rep.main(["--out", str(tmp_path / "x.json"), "--with-record", str(tmp_path / "bad.json"), f"new={new}"]) == 2
    assert not (tmp_path / "x.json").exists()
    assert "--with-record" in capsys.readouterr().err
