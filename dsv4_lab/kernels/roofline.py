"""Roofline points from the saved kernel benchmarks (benchmarks/results/*.json; docs/kernels.md §8-9).

Each point: (name, intensity FLOP/byte, achieved TFLOP/s, achieved TB/s) with useful FLOPs and compulsory bytes
counted as in docs/kernels.md §9.1 (attention 4 H d per visible pair; bytes = Q/O once + each K = V row once per use).
"""
from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "benchmarks", "results")


def load(results_dir: str = RESULTS) -> dict:
    out = {}
    for n in ("dense", "hca", "csa", "mhc", "fake_quant", "summary"):
        p = os.path.join(results_dir, f"{n}.json")
        if os.path.exists(p):
            out[n] = json.load(open(p))
    return out


def _pt(name, flops, nbytes, ms):
    s = ms * 1e-3
    return {"name": name, "intensity": flops / nbytes, "tflops": flops / s / 1e12, "tb_s": nbytes / s / 1e12}


def points(R: dict) -> list[dict]:
    pts = []
    H, D = 16, 128
    for key, r in R.get("dense", {}).get("prefill", {}).items():
        if "ms" in r:
            N = int(key.rsplit("_", 1)[1])
            pts.append(_pt(f"dense {key.rsplit('_', 1)[0]} {N // 1024}K", r["useful_gflop"] * 1e9,
                           4 * N * H * D + 4 * N * D, r["ms"]))
    for key, r in R.get("hca", {}).get("prefill", {}).items():
        if "ms" in r and "useful_gflop" in r:
            N = int(key.rsplit("_", 1)[1])
            pts.append(_pt(f"HCA {key.rsplit('_', 1)[0]} {N // 1024}K", r["useful_gflop"] * 1e9,
                           4 * N * H * D + 2 * N * D + 2 * (N // 128) * D, r["ms"]))
    for key, r in R.get("csa", {}).get("sparse", {}).items():
        if "ms" in r and "tflops" in r:
            N = int(key.rsplit("_", 1)[1])
            flops = r["tflops"] * 1e12 * r["ms"] * 1e-3
            gathered = r["gather_tb_s"] * 1e12 * r["ms"] * 1e-3
            pts.append(_pt(f"CSA sparse attn {N // 1024}K", flops, gathered + 4 * N * H * D, r["ms"]))
    for key, r in R.get("csa", {}).get("indexer", {}).items():
        if "ms" in r and "useful_gflop" in r:
            N = int(key.rsplit("_", 1)[1])
            nbytes = N * 4 * 64 * 2 + (N // 4) * 64 * 2 + N * 512 * 8
            pts.append(_pt(f"indexer fused {N // 1024}K", r["useful_gflop"] * 1e9, nbytes, r["ms"]))
    for r in R.get("mhc", {}).get("runs", []):
        if "pre_triton" in r:
            T, n, d = r["T"], r["n"], r["d"]
            nbytes = T * (3 * n * d * 2 + 2 * d * 2 + 2 * 24 * 4)
            ms = r["pre_triton"]["ms"] + r["post_triton"]["ms"]
            pts.append(_pt(f"mHC pre+post d={d}", 248.0 * d * T, nbytes, ms))
    for r in R.get("fake_quant", {}).get("runs", []):
        if "triton" in r:
            n = r["shape"][0] * r["shape"][1]
            pts.append(_pt(f"fake-quant {r['fmt']}{' tile' if r['tile'] else ''}", 12.0 * n, 4 * n,
                           r["triton"]["ms"]))
    return pts
