"""The selects in one launch against their launches apart, A / B alternated (docs/kernels.md §3). bench_csa.py times
each form in captures one after another; a difference under a microsecond is then inside the spread between two
captures of the same call (benchmarks/README.md T5). Here every form is captured ROUNDS times, the forms taking
turns, and each capture is timed from the GPU's start of its replay (common.bench_graph hold=True) and per call of
CALLS calls in one graph:

    row_fp32      the 256K-entry decode row (k = 512), tail_select: `apart` its two digit launches and the emit
                  (tailselect.PDL as the library runs it), `one` the one cooperative launch (one_launch=True)
    row_bf16      the same row in bf16, radix_select: its two digit launches and the emit, or one launch
    chain_1m      the library's CSA decode at 1M context: indexer (fp32 scores, the first digit counted by the score
                  launch, the tail select) and the split-KV sparse attention, select.ONE_LAUNCH off / on

    {case: {form: {gpu_us: [per capture], in_graph_us: [per capture], gpu_median_us, in_graph_median_us}},
     case + "_same_picks": the forms' outputs equal}

    python benchmarks/probe_one_launch.py [--out benchmarks/results/one_launch_probe.json] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_csa import BF, CHAIN_CALLS as CALLS, D, H, K, M, W, indexer_inputs  # noqa: E402
from common import RESULTS, bench_graph, env_info, write_json  # noqa: E402

from dsv4_lab.kernels.indexer_topk import select as sel  # noqa: E402
from dsv4_lab.kernels.indexer_topk import tailselect as ts  # noqa: E402
from dsv4_lab.kernels.indexer_topk.triton import indexer_topk_triton  # noqa: E402
from dsv4_lab.kernels.sparse_attn.triton import sparse_attn_fwd  # noqa: E402


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def ab(forms: dict, rounds: int) -> dict:
    """forms {name: fn}: `rounds` captures of each, the forms taking turns; each capture timed from the GPU's start
    (one call per replay) and per call of CALLS calls in one graph."""
    out = {f: {"gpu_us": [], "in_graph_us": []} for f in forms}
    for _ in range(rounds):
        for f, fn in forms.items():
            out[f]["gpu_us"].append(bench_graph(fn, hold=True)["ms"] * 1e3)
            out[f]["in_graph_us"].append(bench_graph(lambda fn=fn: [fn() for _ in range(CALLS)], hold=True)["ms"]
                                         * 1e3 / CALLS)
    for r in out.values():
        r["gpu_median_us"], r["in_graph_median_us"] = _median(r["gpu_us"]), _median(r["in_graph_us"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(RESULTS, "one_launch_probe.json"))
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    res = {"env": env_info(), "rounds": a.rounds, "calls_in_graph": CALLS, "k": K}
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, 262144, device="cuda", generator=g)
    xb = x.bfloat16()
    ws = sel.SelectWorkspace(1, programs=256)
    rows = {"row_fp32": {"apart": lambda: ts.tail_select(x, K, workspace=ws, one_launch=False),
                         "one": lambda: ts.tail_select(x, K, workspace=ws, one_launch=True)},
            "row_bf16": {"apart": lambda: sel.radix_select(xb, K, workspace=ws, one_launch=False),
                         "one": lambda: sel.radix_select(xb, K, workspace=ws, one_launch=True)}}
    for case, forms in rows.items():
        outs = [f() for f in forms.values()]
        res[f"{case}_same_picks"] = all(torch.equal(o[1], outs[0][1]) and torch.equal(o[0], outs[0][0])
                                        for o in outs) and not ws.hist.any()
        res[case] = ab(forms, a.rounds)
        print(case, {f: (r["gpu_median_us"], r["in_graph_median_us"]) for f, r in res[case].items()}, flush=True)
    N = 1 << 20                                       # bench_csa.py decode(N)'s inputs
    qI, kI, w = indexer_inputs(N, T=1)
    q = torch.randn(1, 1, H, D, **BF)
    kv = torch.randn(1, N, D, **BF)
    comp = torch.randn(1, N // M, D, **BF)
    sink = torch.randn(H, device="cuda")

    def step(one):
        with mock.patch.object(sel, "ONE_LAUNCH", one):
            idx = indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1)
        return sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W, q_offset=N - 1)
    forms = {"apart": lambda: step(False), "one": lambda: step(True)}
    with mock.patch.object(sel, "ONE_LAUNCH", False):
        i0 = indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1)
    with mock.patch.object(sel, "ONE_LAUNCH", True):
        i1 = indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1)
    res["chain_1m_same_picks"] = bool(torch.equal(i0, i1))
    res["chain_1m"] = ab(forms, a.rounds)
    print("chain_1m", {f: (r["gpu_median_us"], r["in_graph_median_us"]) for f, r in res["chain_1m"].items()})
    print(write_json(a.out, res))


if __name__ == "__main__":
    main()
