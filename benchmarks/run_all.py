"""Run every kernel benchmark on the GPU and build benchmarks/results/summary.json (kernels.md §9).

    python benchmarks/run_all.py [--out DIR] [--only dense hca ...]
    python benchmarks/run_all.py --summary-only        # rebuild summary.json from the saved results (CPU is fine)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")
ORDER = ["fake_quant", "mhc", "dense", "hca", "csa"]
RUN_ORDER = ["hca", "e2e", "csa", "mhc", "fake_quant", "dense"]


def _load(name):
    p = os.path.join(RESULTS, f"{name}.json")
    return json.load(open(p)) if os.path.exists(p) else None


def _get(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def build_summary(out_dir=None) -> dict:
    R = {n: _load(n) for n in ORDER}
    s, reasons = {}, {}

    def put(key, fn, why):
        try:
            v = fn()
        except Exception as e:                                        # noqa: BLE001
            v, why = None, f"{why} ({type(e).__name__}: {e})"
        s[key] = v
        if v is None:
            reasons[key] = why

    N = 131072
    put("hca_prefill_128k_speedup_vs_sdpa_flash",
        lambda: R["dense"]["prefill"][f"sdpa_flash_{N}"]["ms"] / R["hca"]["prefill"][f"triton_{N}"]["ms"],
        "dense or HCA 128K prefill not measured")
    put("hca_prefill_128k_speedup_vs_cudnn",
        lambda: R["dense"]["prefill"][f"cudnn_{N}"]["ms"] / R["hca"]["prefill"][f"triton_{N}"]["ms"],
        "cuDNN or HCA 128K prefill not measured")
    put("hca_prefill_128k_speedup_vs_flex",
        lambda: R["hca"]["prefill"][f"flex_{N}"]["ms"] / R["hca"]["prefill"][f"triton_{N}"]["ms"],
        "FlexAttention or HCA 128K prefill not measured")
    def csa_best():                      # best measured indexer path (fused Triton or chunked torch.topk) + sparse
        c = R["csa"]
        return min(c["indexer"][f"fused_{N}"]["ms"], c["indexer"][f"torch_topk_{N}"]["ms"]) + \
            c["sparse"][f"triton_{N}"]["ms"]
    put("csa_prefill_128k_speedup_vs_sdpa_flash",
        lambda: R["dense"]["prefill"][f"sdpa_flash_{N}"]["ms"] / csa_best(),
        "dense or CSA 128K prefill not measured")
    s["csa_prefill_note"] = ("CSA = best measured indexer+top-k path + Triton sparse attention; compressor excluded; "
                             "csa_prefill_128k_fused_ms uses the fused Triton indexer")
    put("csa_prefill_128k_fused_ms", lambda: R["csa"]["csa_prefill"][f"triton_{N}"]["ms"], "CSA 128K not measured")
    put("csa_prefill_128k_ms", csa_best, "CSA 128K not measured")
    put("hca_prefill_128k_ms", lambda: R["hca"]["prefill"][f"triton_{N}"]["ms"], "HCA 128K not measured")
    put("sparse_attn_128k_gather_tb_s", lambda: R["csa"]["sparse"][f"triton_{N}"]["gather_tb_s"],
        "sparse attention 128K not measured")
    put("indexer_128k_fused_ms", lambda: R["csa"]["indexer"][f"fused_{N}"]["ms"], "indexer 128K not measured")
    put("indexer_128k_torch_topk_ms", lambda: R["csa"]["indexer"][f"torch_topk_{N}"]["ms"],
        "torch indexer 128K not measured")
    put("csa_decode_1m_us", lambda: R["csa"]["decode"]["1048576"]["csa_decode_us"], "CSA decode 1M not measured")
    put("hca_decode_1m_us", lambda: R["hca"]["decode"]["triton_1048576"]["us"], "HCA decode 1M not measured")
    put("dense_decode_1m_cudnn_us", lambda: R["dense"]["decode"]["cudnn_1048576"]["us"], "dense decode not measured")
    put("mhc_fused_fraction_of_copy_bw",
        lambda: next(r for r in R["mhc"]["runs"] if r.get("d") == 1024)["fused_fraction_of_copy_bw"],
        "mHC not measured")
    put("fake_quant_tb_s", lambda: next(r for r in R["fake_quant"]["runs"]
                                        if r.get("fmt") == "fp8" and not r.get("tile"))["triton"]["tb_s"],
        "fake_quant not measured")
    put("fake_quant_mxfp4_tb_s", lambda: next(r for r in R["fake_quant"]["runs"]
                                              if r.get("fmt") == "fp4")["triton"]["tb_s"], "MXFP4 not measured")
    env = next((r["env"] for r in R.values() if r and "env" in r), {})
    ceil = next((r["ceilings"] for r in R.values() if r and "ceilings" in r), {})
    s.update(gpu=env.get("gpu"), torch=env.get("torch"), triton=env.get("triton"), ceilings=ceil)
    e2e = _load("e2e")
    s["e2e_training"] = e2e if e2e else None
    if not e2e:
        reasons["e2e_training"] = "not measured (see benchmarks/README.md)"
    if s.get("hca_prefill_128k_speedup_vs_flex") is None:
        reasons["hca_prefill_128k_speedup_vs_flex"] = (
            "not measured: torch.compile(flex_attention) with create_block_mask(_compile=True) over "
            "concat(compressed, raw) did not finish compiling within ~150 s at N = 8K in two device runs "
            "(runs 2 and 3, benchmarks/results/run*_*.log); kernels.md's anchor value for Flex at 128K is 2.63 ms")
    s["reason"] = reasons
    s["targets"] = {
        "T1_hca_vs_flex_>=1.25x": s.get("hca_prefill_128k_speedup_vs_flex"),
        "T2_csa_128k_>=10x_vs_fa2": s.get("csa_prefill_128k_speedup_vs_sdpa_flash"),
        "T3_sparse_gather_>=2.5TB/s": s.get("sparse_attn_128k_gather_tb_s"),
        "T6_csa_decode_1m_<=40us": s.get("csa_decode_1m_us"),
        "T7_hca_decode_1m_<=15us": s.get("hca_decode_1m_us"),
        "T8_mhc_>=0.70_of_copy": s.get("mhc_fused_fraction_of_copy_bw"),
        "T10_fake_quant_>=3.4TB/s": s.get("fake_quant_tb_s"),
    }
    for d in [RESULTS] + ([out_dir] if out_dir else []):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(s, f, indent=1)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--summary-only", action="store_true")
    a = ap.parse_args()
    if not a.summary_only:
        import importlib
        import traceback
        for name in RUN_ORDER:
            if a.only and name not in a.only:
                continue
            t0 = time.time()
            try:
                importlib.import_module(f"bench_{name}").main(a.out)
            except Exception:                                         # noqa: BLE001
                traceback.print_exc()
            print(f"== {name} done in {time.time() - t0:.1f} s", flush=True)
    print(json.dumps(build_summary(a.out), indent=1))


if __name__ == "__main__":
    main()
