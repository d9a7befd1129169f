"""benchmarks/common.py's host_stages_ms on the CPU, with a fake clock: each stage's host time per call is the time
between its mark and the previous one (the first stage's from the call's start), the median over rounds."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def test_host_stages_split_each_call_by_its_marks(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    cost = {"a": 2e-3, "b": 1e-3, "c": 5e-3}                   # seconds of host time per call in each stage
    calls = [0]

    def run(mark):                                            # 2 warm-up calls, then rounds of 4 calls
        slow = 3.0 if (calls[0] - 2) // 4 == 1 else 1.0         # the second round 3x slower: the median skips it
        for name in ("a", "b", "c"):
            clock[0] += cost[name] * slow
            mark(name)
        calls[0] += 1
    out = common.host_stages_ms(run, calls=4, reps=5)
    assert calls[0] == 2 + 4 * 5 and list(out) == ["a", "b", "c"]
    assert all(abs(out[k] - 1e3 * cost[k]) < 1e-9 for k in cost), out


def test_csa_family_results_replace_their_entries_whole():
    """bench_csa merges a family's results into csa.json entry by entry: an entry it wrote loses the keys of an
    earlier run (a removed method's), the entries and sections it did not write stay."""
    import bench_csa
    saved = {"decode": {"1048576": {"csa_decode_us": 50.2, "indexer_fused_us": 46557.3},
                        "131072": {"csa_decode_us": 36.8}},
             "topk_row": {"262144": {"select_us": 36.3}}, "families": {"topk_row": {"status": "ok"}}}
    bench_csa._merge(saved, {"decode": {"1048576": {"csa_decode_us": 49.0}}, "families": {"decode": {"status": "ok"}}})
    assert saved["decode"] == {"1048576": {"csa_decode_us": 49.0}, "131072": {"csa_decode_us": 36.8}}
    assert saved["topk_row"] == {"262144": {"select_us": 36.3}}
    assert saved["families"] == {"topk_row": {"status": "ok"}, "decode": {"status": "ok"}}


def test_host_ms_is_the_median_round_per_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    calls = [0]

    def fn():                                                 # 3 warm-up calls, then rounds of 2 calls
        clock[0] += 4e-3 * (2.0 if (calls[0] - 3) // 2 == 0 else 1.0)   # the first round twice as slow
        calls[0] += 1
    out = common.host_ms(fn, calls=2, reps=3)
    assert calls[0] == 3 + 2 * 3
    assert abs(out["ms"] - 4.0) < 1e-9 and abs(out["min_ms"] - 4.0) < 1e-9 and abs(out["max_ms"] - 8.0) < 1e-9


def test_csa_try_settings_apply_and_bad_names_exit_2(monkeypatch, capsys):
    """CSA_TRY (bench_csa.py): the named trial settings are applied in a family's process (the selects' inline
    stores on, the score candidates appended to the autotune list, decode's fused first digit on, fp32 rows through
    the tail select); an unknown name
    is a one-line error, exit 2."""
    import bench_csa
    from dsv4_lab.kernels.indexer_topk import select as sel
    monkeypatch.setenv("CSA_TRY", "score_candidates,fuse_level0,asm_stores,fp32_tail")
    assert bench_csa._trying() == ("asm_stores", "fp32_tail", "fuse_level0", "score_candidates")
    monkeypatch.setattr(sel, "ASM_STORES", False)
    monkeypatch.setattr(bench_csa.itk, "FUSE_LEVEL0", False)
    monkeypatch.setattr(bench_csa.itk, "FP32_TAIL", False)
    configs = bench_csa.itk._indexer_scores_fwd.configs
    monkeypatch.setattr(bench_csa.itk._indexer_scores_fwd, "configs", list(configs))
    bench_csa._apply_try(bench_csa._trying())
    assert sel.ASM_STORES is True and bench_csa.itk.FUSE_LEVEL0 is True and bench_csa.itk.FP32_TAIL is True
    assert bench_csa.itk._indexer_scores_fwd.configs == list(configs) + bench_csa.itk.SCORE_CANDIDATE_CONFIGS
    with pytest.raises(SystemExit) as e:
        bench_csa._apply_try(("fast",))
    assert e.value.code == 2 and "CSA_TRY='fast'" in capsys.readouterr().err


def test_replays_us_takes_the_median_capture(monkeypatch):
    """replays_us with captures=3 times three captures both ways, in turn, and keeps each way's middle one (and every
    capture's); with one capture it keeps that one and lists none."""
    times = iter([0.021, 0.018, 0.019, 0.0185, 0.025, 0.017])           # ms: capture 1 (one call, GPU), 2, 3
    calls = []

    def fake(fn, reps=50, hold=False):
        calls.append(hold)
        return {"ms": next(times)}
    monkeypatch.setattr(common, "bench_graph", fake)
    out = {}
    common.replays_us(out, "x", lambda: None, captures=3)
    assert calls == [False, True] * 3
    assert out["x_us"] == 21.0 and out["x_gpu_us"] == 18.0, out
    assert out["x_captures_us"] == [21.0, 19.0, 25.0] and out["x_gpu_captures_us"] == [18.0, 18.5, 17.0], out
    times = iter([0.03, 0.02])
    out = {}
    common.replays_us(out, "y", lambda: None)
    assert out == {"y_us": 30.0, "y_gpu_us": 20.0}


def test_bench_queued_drops_a_round_the_host_did_not_queue_in_time(monkeypatch):
    """bench_queued: a round in which one call was not queued before the sleep ended (the event after the sleep
    already reached) is dropped and the next round sleeps twice as long; the held round's median and p10 / p90 are
    returned with its cycles; with every round unheld, held=False and the last round's times."""
    sleeps, queries, times = [], iter([False, True, False, False, False]), iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.6])

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def query(self):
            return next(queries)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return next(times)

    class Buf:
        def zero_(self):
            pass
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", sleeps.append)
    monkeypatch.setattr(common.torch, "empty", lambda *a, **k: Buf())
    calls = []
    out = common.bench_queued(lambda: calls.append(1), reps=3, cycles=100, tries=4)
    assert sleeps == [100] * 3 + [200] * 3 and len(calls) == 6          # round 1 (its 2nd call unheld), round 2
    assert out == {"ms": 0.2, "p10_ms": 0.1, "p90_ms": 0.6, "cycles": 200, "held": True}
    queries, times = iter([True] * 4), iter([1.0] * 4)
    out = common.bench_queued(lambda: None, reps=2, cycles=10, tries=2)
    assert out["held"] is False and out["cycles"] == 20 and out["ms"] == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_queued_times_a_launch_bound_call_without_its_host_gaps():
    """On a GPU: a call of 400 tiny launches, which the host enqueues more slowly than the GPU runs them, takes less
    GPU time queued behind the sleep than do_bench's eager time, and every call of the returned round was held."""
    x = torch.zeros(16, device="cuda")

    def fn():
        for _ in range(400):
            x.add_(1.0)
    q, e = common.bench_queued(fn, reps=20), common.bench(fn, warmup=3, rep=20)
    assert q["held"] and q["ms"] < 0.8 * e["ms"], (q, e)
