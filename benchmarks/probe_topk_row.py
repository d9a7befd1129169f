"""Where one decode row's top-k time goes (256K scores, k = 512, fp32 and bf16 rows). bench_csa.py `topk_row` times
whole calls, one call per CUDA-graph replay; this probe splits that figure into what a replay costs with (almost)
nothing in it, what each launch of `select` adds, and what a call costs among other kernels of one graph, as it runs
inside a decode step's graph (docs/kernels.md §3).

    floor_us                     {n: one replay of a graph of n launches of a trivial kernel (128 programs of 8
                                 warps, select's grid), n = 1, 2, 5}: the replay's own start and each launch's step
    floor_gpu_us                 the same replays timed from the GPU's start of each (bench_graph hold=True)
    <method>_<dtype>             select (radix_select), tail (tail_select, fp32 rows, pdl=False), select_pdl /
                                 tail_pdl (the same with programmatic dependent launch: select.py, tailselect.py
                                 PDL), tail_w4 / tail_w16 (tail_pdl at 4 / 16 warps, not 8), torch (torch.topk,
                                 sorted):
        replay_us                one call per replay (bench_csa.py's figure, common.bench_graph)
        in_graph_us              CALLS calls captured in one graph: one replay / CALLS
    select_<dtype>_launches_us   {j: one replay of [zero the workspace, select's first j launches]}, j = 0..NL + 1
                                 (NL digit launches, then the emit): the step from j - 1 to j is launch j's cost
    tail_parts_us / _gpu_us      {restore, walk, emit}: one replay of [restore the workspace as the tail select's
                                 two digit launches left it, then its emit launch: none (restore), without the row's
                                 last program's tail (walk), whole (emit)] (tail_parts); emit - walk is the tail's cost,
                                 walk - restore the rest of the emit launch; _gpu_us from the GPU's start of each;
    replay_anatomy               {floor (the one trivial launch), tail_fp32 (tail_select at its defaults): what one
                                 replay holds: the host's time in the g.replay() call, the kernels one profiled
                                 replay ran with their GPU times, the host-side ops seen (common.replay_anatomy)}: the
                                 replay's own start taken apart
Every method's picks are checked against torch.topk's values, and the probe's own launch sequence against
radix_select's output, bit for bit.

    python benchmarks/probe_topk_row.py [--out benchmarks/results/topk_row_probe.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import bench_graph, env_info, replay_anatomy, write_json  # noqa: E402
from dsv4_lab.kernels._common import next_pow2, tl, triton  # noqa: E402
from dsv4_lab.kernels.indexer_topk import select as sel  # noqa: E402
from dsv4_lab.kernels.indexer_topk import tailselect as ts  # noqa: E402

L, K, CALLS = 262144, 512, 20


@triton.jit
def _touch(X):
    tl.store(X + tl.program_id(0), 1)


def in_graph_us(fn, calls=CALLS):
    """Microseconds per call of fn with `calls` calls captured back to back in one graph."""
    return bench_graph(lambda: [fn() for _ in range(calls)])["ms"] * 1e3 / calls


def select_launches(row, ws, oval, oidx):
    """radix_select(row, K) as its launches, for one row at decode's defaults (8-bit digits, 2048-entry chunks over
    default_programs, 8 warps): run(j) zeroes the workspace's histograms, then runs the first j launches."""
    P, C = sel.chunks(L, sel.default_programs(1, L), 2048)
    NL = sel.digit_levels(row.dtype, 8)
    ws.fit_select(1, P, NL, 8, row.device)

    def run(j):
        ws.hist.zero_()
        for lev in range(min(j, NL)):
            sel._hist_level[(P, 1)](row, ws.hist, ws.scratch, L, C, P, row.stride(0), 1, 0, K, LEVEL=lev, NL=NL,
                                    DB=8, RATIO=0, BLOCK=2048, PDL=0, num_warps=8)
        if j > NL:
            sel._emit[(P, 1)](row, ws.hist, ws.scratch, oval, oidx, L, C, P, row.stride(0), oval.stride(0), 1, 0, K,
                              NL=NL, DB=8, RATIO=0, BLOCK=2048, QB=128, ASM=sel.asm_stores_on(None), PDL=0,
                              num_warps=8)
    return run, NL


def tail_parts(row, ws, oval, oidx, block=2048, cap=1024, small=64):
    """The tail select's emit launch taken apart, for one fp32 row at decode's defaults (block-entry chunks over
    default_programs, CAP cap, the small tile small, 8 warps, no PDL). Its two digit launches run once, and the
    workspace after them is kept; run(part) restores that workspace (part "restore": nothing more), then runs the
    emit: "emit" as the library does, "walk" with the row's ticket counter set so far below zero that no program is
    the row's last (every program's suffix-count reads, chunk walk, list stores and ticket, but no tail).
    -> (run, ok): ok when run("emit") gives tail_select's output bit for bit."""
    P, C = sel.chunks(row.shape[-1], sel.default_programs(1, row.shape[-1]), block)
    ws.hist.zero_()
    v, i = ts.tail_select(row, K, workspace=ws, block=block, cap=cap, small_cap=small, pdl=False)  # leaves it zeroed
    for lev in range(2):
        sel._hist_level[(P, 1)](row, ws.hist, ws.scratch, row.shape[-1], C, P, row.stride(0), 1, 0, K, LEVEL=lev,
                                NL=2, DB=8, RATIO=0, BLOCK=block, PDL=0, num_warps=8)
    hist, scratch = ws.hist.clone(), ws.scratch.clone()
    walk = hist.clone()
    walk[2 * 256] = -(1 << 30)                 # row 0's ticket counter (select._row_base: the table's 513th word)
    tv, ti = torch.empty(K, device=row.device), torch.empty(K, dtype=torch.int32, device=row.device)
    bv, bi = torch.empty(cap, device=row.device), torch.empty(cap, dtype=torch.int32, device=row.device)
    tc, bc = torch.empty_like(ti), torch.empty_like(bi)

    def run(part):
        ws.hist.copy_(walk if part == "walk" else hist)
        ws.scratch[:scratch.numel()].copy_(scratch)
        if part != "restore":
            ts._emit_tail[(P, 1)](row, ws.hist, ws.scratch, tv, ti, bv, bi, tc, bc, oval, oidx, row.shape[-1], C, P,
                                  row.stride(0), oval.stride(0), 1, 0, K, RATIO=0, BLOCK=block, QB=128, KP=next_pow2(K),
                                  CAP=cap, SMALL=small, ASM=sel.asm_stores_on(None), PDL=0, num_warps=8)
    run("emit")
    ok = bool(torch.equal(oidx, i) and torch.equal(oval, v))
    ws.hist.zero_()
    return run, ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "topk_row_probe.json"))
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, L, device="cuda", generator=g)                      # bench_csa.py topk_row's rows
    out = {"env": env_info(), "L": L, "k": K, "calls_in_graph": CALLS}
    flag = torch.zeros(128, dtype=torch.int32, device="cuda")
    out["floor_us"] = {n: bench_graph(lambda n=n: [_touch[(128,)](flag, num_warps=8) for _ in range(n)])["ms"] * 1e3
                       for n in (1, 2, 5)}
    out["floor_gpu_us"] = {n: bench_graph(lambda n=n: [_touch[(128,)](flag, num_warps=8) for _ in range(n)],
                                          hold=True)["ms"] * 1e3 for n in (1, 2, 5)}
    ws = sel.SelectWorkspace(1, programs=256)
    for nm, row in (("fp32", x), ("bf16", x.bfloat16())):
        ref = torch.topk(row.float(), K).values
        v, i = sel.radix_select(row, K, workspace=ws, one_launch=False)
        methods = {"select": lambda row=row: sel.radix_select(row, K, workspace=ws, one_launch=False),
                   "select_pdl": lambda row=row: sel.radix_select(row, K, workspace=ws, one_launch=False, pdl=True),
                   **({"tail": lambda row=row: ts.tail_select(row, K, workspace=ws, pdl=False),
                       "tail_pdl": lambda row=row: ts.tail_select(row, K, workspace=ws, pdl=True),
                       **{f"tail_w{w}": lambda row=row, w=w: ts.tail_select(row, K, workspace=ws, pdl=True,
                                                                            num_warps=w) for w in (4, 16)}}
                      if nm == "fp32" else {}),
                   "torch": lambda row=row: torch.topk(row, K)}
        for m, fn in methods.items():
            got = fn()[0].float()
            out[f"{m}_{nm}_values_match_torch_topk"] = bool(torch.equal(torch.sort(got, -1, descending=True).values,
                                                                        ref))
            out[f"{m}_{nm}"] = {"replay_us": bench_graph(fn)["ms"] * 1e3, "in_graph_us": in_graph_us(fn)}
        oval, oidx = torch.empty_like(v), torch.empty_like(i)
        run, NL = select_launches(row, ws, oval, oidx)
        run(NL + 1)
        out[f"select_{nm}_launches_match_radix_select"] = bool(torch.equal(oidx, i) and torch.equal(oval, v))
        out[f"select_{nm}_launches_us"] = {j: bench_graph(lambda j=j: run(j))["ms"] * 1e3 for j in range(NL + 2)}
        ws.hist.zero_()
        if nm == "fp32":
            run, ok = tail_parts(row, ws, oval, oidx)                # restore only, walk and ticket, the whole emit
            out["tail_parts_match_tail_select"] = ok
            out["tail_parts_us"] = {part: bench_graph(lambda part=part: run(part))["ms"] * 1e3
                                    for part in ("restore", "walk", "emit")}
            out["tail_parts_gpu_us"] = {part: bench_graph(lambda part=part: run(part), hold=True)["ms"] * 1e3
                                        for part in ("restore", "walk", "emit")}
            ws.hist.zero_()
        print(nm, {kk: vv for kk, vv in out.items() if nm in kk}, flush=True)
    anatomy = out["replay_anatomy"] = {}
    for nm, fn in (("floor", lambda: _touch[(128,)](flag, num_warps=8)),
                   ("tail_fp32", lambda: ts.tail_select(x, K, workspace=ws))):
        try:
            anatomy[nm] = replay_anatomy(fn)
        except Exception as e:                                                 # noqa: BLE001
            anatomy[nm] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print("floor_us", out["floor_us"], "floor_gpu_us", out["floor_gpu_us"], "replay_anatomy", anatomy)
    print(write_json(a.out, out))


if __name__ == "__main__":
    main()
