"""benchmarks/bench_e2e.py's planning on the CPU: `--budget` starts no measurement that the records say will not fit
(a cold compile=blocks point takes minutes), and the summary keys come from the best finished mode per arm."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_e2e  # noqa: E402

RUNS = {
    "v4_4096_blocks": {"mode": "blocks", "tokens_per_s": 3.0e5, "peak_mem_gb": 28.0, "wall_s": 173.6},
    "v4_65536_blocks": {"mode": "blocks", "tokens_per_s": 2.5e5, "peak_mem_gb": 28.5, "wall_s": 193.9},
    "v4_16384_blocks": {"error": "wall-clock cap: 164 s", "wall_s": 164.7},          # unfinished: not a plan
    "v4_4096_eager": {"mode": "eager", "tokens_per_s": 2.2e5, "peak_mem_gb": 35.0, "wall_s": 99.5},
    "dense_4096_compiled": {"mode": "compiled", "tokens_per_s": 1.0e6, "peak_mem_gb": 12.0, "wall_s": 52.3},
}


def test_expected_time_is_the_longest_finished_point_of_that_arm_and_mode():
    assert bench_e2e.expected_s(RUNS, "v4", "blocks") == 193.9
    assert bench_e2e.expected_s(RUNS, "v4", "eager") == 99.5
    assert bench_e2e.expected_s(RUNS, "dense", "compiled") == 52.3
    assert bench_e2e.expected_s(RUNS, "dense", "blocks") == 0.0                      # nothing on record


def test_budget_skips_a_point_that_would_not_fit_and_starts_one_that_would(tmp_path, monkeypatch):
    runs = {k: v for k, v in RUNS.items() if k != "v4_16384_blocks"}
    (tmp_path / "e2e.json").write_text(json.dumps({"format": 2, "runs": runs, "breakdown": {"ms": {}}}))
    monkeypatch.setattr(bench_e2e, "RESULTS", str(tmp_path))
    started = []

    def child(args, cap):
        started.append((args[1], args[2], args[3], cap))
        return {"mode": args[3], "tokens_per_s": 1.0, "peak_mem_gb": 1.0, "wall_s": 1.0}

    monkeypatch.setattr(bench_e2e, "_child", child)
    res = bench_e2e.main(None, (16384,), ("v4",), ("blocks", "eager"), budget=150.0)
    assert [s[:3] for s in started] == [("small", "16384", "eager")]    # blocks needs ~194 s, eager ~100 s
    assert started[0][3] <= 150.0
    assert "v4_16384_blocks" not in res["runs"] and res["runs"]["v4_16384_eager"]["tokens_per_s"] == 1.0
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["runs"]["v4_4096_blocks"] == RUNS["v4_4096_blocks"]                # earlier records kept
    assert json.loads((tmp_path / "summary.json").read_text())["e2e_tokens_per_s"]["v4"]["16384"] == 1.0


def test_kernel_families_of_a_compiled_step_profile():
    """Inside compiled regions the profiler keeps no component ranges: ops are grouped by what they launch. Our
    kernels by the kernels/ folder that defines them (with the numeric suffix a compiled graph gives a launch), the
    rest by name; names from run 31's profile of a compiled V4 step."""
    table = bench_e2e.kernel_table()
    assert {"_sparse_fwd", "_sparse_bwd", "_window_bwd", "_hca_bwd", "_indexer_scores_fwd", "_kl_fwd", "_kl_bwd",
            "_mhc_pre_kernel", "_mhc_pre_bwd_kernel", "_swiglu_fwd", "_rmsnorm_bwd"} <= set(table)
    expect = {"_sparse_bwd_6": "attention", "_window_bwd_5": "attention", "_kl_bwd_5": "kl", "_kl_fwd": "kl",
              "_mhc_pre_bwd_kernel_2": "mhc", "_mhc_dw_kernel_3": "mhc", "_swiglu_bwd_1": "ffn",
              "aten::_grouped_mm": "moe", "aten::topk": "topk", "aten::mm": "gemm",
              "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13Gemm"
              "UniversalINS5_17GroupProblem": "moe",
              "triton_poi_fused__to_copy__unsafe_view_add_arange_clone_index_mul_neg": "inductor glue",
              "aten::copy_": "eager glue", "Optimizer.step#AdamW.step": "optimizer",
              "aten::_foreach_addcdiv_": "optimizer", "SparseKLFnBackward": "kl", "e2e::mtp": "other"}
    for name, fam in expect.items():
        assert bench_e2e.kernel_family(name, table) == fam, (name, bench_e2e.kernel_family(name, table), fam)


def test_a_variant_arm_competes_for_its_arms_best_setting_and_is_named():
    """v4-bf16-index (the v4 arm with index_score_dtype=bf16) is a setting of v4: where it is faster, it is the v4
    number and e2e_best_settings names the override; it never becomes an arm of its own in the summary."""
    runs = {"v4_4096_blocks": {"mode": "blocks", "tokens_per_s": 3.0e5, "peak_mem_gb": 23.0},
            "v4-bf16-index_4096_blocks": {"mode": "blocks", "tokens_per_s": 3.2e5, "peak_mem_gb": 22.0},
            "v4_16384_blocks": {"mode": "blocks", "tokens_per_s": 3.1e5, "peak_mem_gb": 23.0},
            "v4-bf16-index_16384_blocks": {"mode": "blocks", "tokens_per_s": 3.0e5, "peak_mem_gb": 23.0},
            "dense_4096_compiled": {"mode": "compiled", "tokens_per_s": 1.0e6, "peak_mem_gb": 12.0},
            "dense_16384_compiled": {"mode": "compiled", "tokens_per_s": 5.0e5, "peak_mem_gb": 12.0}}
    s = bench_e2e.summary_keys(runs, (4096, 16384))
    assert set(s["e2e_tokens_per_s"]) == {"v4", "dense"}
    assert s["e2e_tokens_per_s"]["v4"] == {"4096": 3.2e5, "16384": 3.1e5}
    assert s["e2e_best_settings"]["v4"] == {"4096": "blocks, index_score_dtype=bf16", "16384": "blocks"}
    assert s["e2e_peak_mem_gb"]["v4"]["4096"] == 22.0 and abs(s["e2e_v4_over_dense"]["4096"] - 0.32) < 1e-12
    cfg = bench_e2e._config(bench_e2e.ARMS["v4-bf16-index"], max_seq_len=4096)
    assert cfg.index_score_dtype == "bf16" and cfg.max_seq_len == 4096 and cfg.index_topk == 512
    assert bench_e2e._config("small", max_seq_len=8192).index_score_dtype == "fp32"


def test_arm_modes_measure_each_arm_in_its_own_modes_context_by_context(tmp_path, monkeypatch):
    """--arm-modes v4=blocks dense=compiled: each context pairs the two arms before the next context starts (a capped
    call leaves paired points), and no arm runs in the other's mode."""
    monkeypatch.setattr(bench_e2e, "RESULTS", str(tmp_path))
    started = []

    def child(args, cap):
        if args[0] == "--breakdown":                                           # the profile after the points
            return {"error": "not profiled here"}
        started.append((args[1], args[2], args[3]))
        return {"mode": args[3], "tokens_per_s": 1.0, "peak_mem_gb": 1.0, "wall_s": 1.0}

    monkeypatch.setattr(bench_e2e, "_child", child)
    bench_e2e.main(None, (4096, 16384), ("v4", "dense"), ("eager",), fresh=True,
                   arm_modes={"v4": ("blocks",), "dense": ("compiled",)})
    assert started == [("small", "4096", "blocks"), ("small-dense", "4096", "compiled"),
                           ("small", "16384", "blocks"), ("small-dense", "16384", "compiled")]
    rec = json.loads((tmp_path / "e2e.json").read_text())
    assert {"commit", "dirty", "time"} <= rec["breakdown"].keys()              # the profile names its code, as a point
