"""Where the sieve select's time goes (indexer_topk/sieve.py): its stages as separate kernels, each timed alone on the
rows of a 128K prefill's longest query chunk (8192 rows of 30-32K visible bf16 scores, k 512), beside the whole
kernel. A probe: the stage kernels are cut-down copies of the sieve's loops, kept here, not in the package.

    stream   load + keys + one compare and one sum per block (the pass's memory traffic and its cheapest ALU work)
    sieve    stream + the cumsum and the candidates' scattered stores (the sieve pass as sieve.py runs it: inline PTX
             stores, select.py _scatter); sieve_tlstore the same with tl.store (before it)
    guess    the sampled key of rank ~2k (NS x SB samples, bisection)
    select   the k-th key among CAND candidate slots and the emit (the candidate select in registers)
    full     sieve_select itself (asm_stores on; _tlstore: off), and whether its picks equal those with tl.store;
             full_rowsel: row_select (one program holds the whole row) on the same rows

    python benchmarks/probe_sieve_parts.py [--rows 8192] [--out benchmarks/results/sieve_parts.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, env_info, write_json  # noqa: E402
from dsv4_lab.kernels._common import tl, triton  # noqa: E402
from dsv4_lab.kernels.indexer_topk.rowselect import _keys, _kth_key  # noqa: E402
from dsv4_lab.kernels.indexer_topk.select import _row_len, _scatter, _store_picks  # noqa: E402
from dsv4_lab.kernels.indexer_topk.sieve import sieve_select  # noqa: E402

K, M = 512, 4


@triton.jit
def _stream(VAL, OUT, L, sv, Tq, q0, tau, RATIO: tl.constexpr, LOW: tl.constexpr, BLOCK: tl.constexpr,
            SCAN: tl.constexpr, CAND: tl.constexpr):
    row = tl.program_id(0)
    n = _row_len(row, L, Tq, q0, RATIO)
    vrow = VAL + row.to(tl.int64) * sv
    cbase = row.to(tl.int64) * CAND
    cnt = tl.full([], 0, tl.int32)
    for st in range(0, n, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        mb = offs < n
        xb = tl.load(vrow + offs, mask=mb, other=0.0).to(tl.float32)
        c = mb & (_keys(xb, mb, LOW) >= tau)
        if SCAN > 0:
            pos = cnt + tl.cumsum(c.to(tl.int32), 0) - 1
            _scatter(OUT + cbase + pos, xb, c & (pos < CAND), SCAN == 2)
        cnt += tl.sum(c.to(tl.int32), 0)
    tl.store(OUT + cbase + CAND - 1, cnt.to(tl.float32))


@triton.jit
def _guess(VAL, OUT, L, sv, Tq, q0, k, RATIO: tl.constexpr, LOW: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr):
    row = tl.program_id(0)
    n = _row_len(row, L, Tq, q0, RATIO)
    vrow = VAL + row.to(tl.int64) * sv
    sb = tl.arange(0, NS * SB)
    p = (sb // SB) * (n - SB) // (NS - 1) + sb % SB
    ss = _keys(tl.load(vrow + p).to(tl.float32), sb >= 0, LOW)
    r = tl.minimum((2 * k * NS * SB + n - 1) // n, NS * SB)
    tl.store(OUT + row, _kth_key(ss, r, 32 - LOW))


@triton.jit
def _select(CV, OVAL, OIDX, cnt, k, LOW: tl.constexpr, CAND: tl.constexpr, ASM: tl.constexpr):
    row = tl.program_id(0)
    j = tl.arange(0, CAND)
    mj = j < cnt
    x = tl.load(CV + row.to(tl.int64) * CAND + j, mask=mj, other=0.0)
    s = _keys(x, mj, LOW)
    t = _kth_key(s, k, 32 - LOW)
    n_gt = tl.sum((s > t).to(tl.int32), 0)
    zero = tl.full([], 0, tl.int32)
    _store_picks(x, j, s > t, mj & (s == t), zero, zero, n_gt, k, OVAL, OIDX, row.to(tl.int64) * k, ASM)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/sieve_parts.json")
    a = ap.parse_args(argv)
    R, L = a.rows, 32768
    fr = (R, M * L - R, M)
    g = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(R, L, device="cuda", generator=g).bfloat16()
    low = 16
    # tau for the stream kernels: the bf16 key of the value with ~2k / 32K of a normal row above it
    q = torch.quantile(x[0, :30000].float(), 1 - 2 * K / 30000).item()
    assert q > 0, "the tau quantile of randn rows is positive"
    tau = int(torch.tensor([q], dtype=torch.float32).view(torch.int32).item()) >> low    # a positive value's key
    cand = 2048
    out = torch.zeros(R * cand, device="cuda")
    res = {"R": R, "L": L, "k": K, "frontier": list(fr), "tau_key": tau, "cand": cand}
    Tq, q0, ratio = fr
    for block in (1024, 2048, 4096):
        for nw in (1, 2, 4, 8):
            for scan in (0, 1, 2):
                tag = f"{('stream', 'sieve_tlstore', 'sieve')[scan]}_b{block}_nw{nw}"
                f = lambda b=block, w=nw, s=scan: _stream[(R,)](x, out, L, x.stride(0), Tq, q0, tau, RATIO=ratio,
                                                                  LOW=low, BLOCK=b, SCAN=s, CAND=cand, num_warps=w)
                try:
                    f()
                    torch.cuda.synchronize()
                    res[f"{tag}_ms"] = bench(f, warmup=3, rep=20)["ms"]
                    res[f"{tag}_mean_count"] = out.view(R, cand)[:, -1].mean().item()
                except Exception as e:                                          # noqa: BLE001
                    res[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    tout = torch.empty(R, dtype=torch.int32, device="cuda")
    for nw in (1, 2, 4, 8):
        f = lambda w=nw: _guess[(R,)](x, tout, L, x.stride(0), Tq, q0, K, RATIO=ratio, LOW=low, NS=16, SB=64,
                                      num_warps=w)
        res[f"guess_nw{nw}_ms"] = bench(f, warmup=3, rep=20)["ms"]
    cv = torch.randn(R * cand, device="cuda", generator=g).bfloat16().float()
    oval = torch.empty(R, K, device="cuda")
    oidx = torch.empty(R, K, dtype=torch.int32, device="cuda")
    from dsv4_lab.kernels.indexer_topk.rowselect import row_select
    for asm, t in ((False, "_tlstore"), (True, "")):
        for nw in (1, 2, 4, 8):
            f = lambda w=nw, a=asm: _select[(R,)](cv, oval, oidx, 1100, K, LOW=low, CAND=cand, ASM=a, num_warps=w)
            res[f"select{t}_nw{nw}_ms"] = bench(f, warmup=3, rep=20)["ms"]
        ref = sieve_select(x, K, frontier=fr, asm_stores=False)
        for nw in (2, 4, 8):
            got = sieve_select(x, K, frontier=fr, num_warps=nw, asm_stores=asm)
            res[f"full{t}_nw{nw}_same_picks"] = bool(torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]))
            res[f"full{t}_nw{nw}_ms"] = bench(lambda w=nw, a=asm: sieve_select(x, K, frontier=fr, num_warps=w,
                                                                              asm_stores=a), warmup=3, rep=20)["ms"]
        for nw in (8, 16):
            got = row_select(x, K, frontier=fr, num_warps=nw, asm_stores=asm)
            res[f"full_rowsel{t}_nw{nw}_same_picks"] = bool(torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]))
            res[f"full_rowsel{t}_nw{nw}_ms"] = bench(lambda w=nw, a=asm: row_select(x, K, frontier=fr, num_warps=w,
                                                                                   asm_stores=a), warmup=3,
                                                     rep=20)["ms"]
    res["bytes_read_GB"] = sum(min(L, (fr[1] + i + 1) // M) for i in range(R)) * 2 / 1e9
    write_json(a.out, {"env": env_info(), "sieve_parts": res})
    for k_, v in res.items():
        print(k_, v)


if __name__ == "__main__":
    main()
