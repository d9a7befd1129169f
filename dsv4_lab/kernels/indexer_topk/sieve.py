"""Sieve select: exact top-k of long prefill score rows through a guessed threshold (docs/kernels.md §3).

    sieve_select(val, k, frontier=None, out=None, paths=None) -> (vals (R, k) fp32, idx (R, k) int32)

One program per row, one launch, for rows too long for one program's registers (rowselect.py holds at most MAX_L
entries, and spills well before that). Keys are rowselect.py's (signed int32, the low 16 bits dropped for bf16 rows).

    guess     NS blocks of SB contiguous entries spread over the row's n visible entries (NS SB keys, read once) and
              the key tau of rank r = ceil(2 k NS SB / n) among them, by bisection on the key bits: about 2k of the
              row's entries should have a key >= tau
    sieve     the row in blocks of BLOCK entries: the entries with key >= tau go, in index order, to the program's
              CAND slots of a scratch buffer (value and index), and are counted
    select    if k <= count <= CAND, the top-k of the row are the top-k of the candidates (every other entry has a
              key below tau, and tau is at most every candidate's key, so all entries tied at the k-th key are
              candidates): the row select on the candidates in registers (the k-th key by bisection, then the emit)
    ties      if more than CAND entries passed but fewer than k lie strictly above tau (counted in one more pass;
              entries tied in bulk at the guess), tau is the k-th key itself: the emit streamed over the row
    fallback  otherwise (a guess that let fewer than k entries through, or more than CAND above it: scores whose
              order follows their position), the same bisection streamed over the whole row, one pass per key bit,
              then the emit streamed
Rows with at most CAND visible entries are their own candidates (no guess, no sieve).

Output: radix_select's (select.py), slot for slot: the entries above the k-th key in index order, then the
lowest-index entries equal to it in index order; -inf picks report index -1; a row with n <= k visible entries takes
them all in index order (slot = column; -1 / -inf after). frontier as in select.py. `paths` (R,) int32, if given,
receives each row's path: 0 all taken (n <= k), 1 own candidates (n <= CAND), 2 sieve, 3 ties, 4 fallback.
Deterministic (no atomics), no host synchronisation, CUDA-graph safe; scratch R x CAND x 8 bytes.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, next_pow2, tl, triton
from .rowselect import _keys, _kth_key
from .select import _row_len, _scatter, _store_picks, _take_all, asm_stores_on, rows_and_outputs


@triton.jit
def _count_from(vrow, n, key, LOW: tl.constexpr, BLOCK: tl.constexpr, ABOVE: tl.constexpr):
    """How many of the row's first n entries have a key >= `key` (ABOVE: > `key`), in one pass over the row."""
    c = tl.full([], 0, tl.int32)
    for st in range(0, n, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        m = offs < n
        s = _keys(tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32), m, LOW)
        if ABOVE:
            c += tl.sum((s > key).to(tl.int32), 0)
        else:
            c += tl.sum((s >= key).to(tl.int32), 0)
    return c


@triton.jit
def _sieve_select(VAL, CV, CI, OVAL, OIDX, PATH, L, sv, so, Tq, q0, k, RATIO: tl.constexpr, LOW: tl.constexpr,
                  CAND: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr):
    NB: tl.constexpr = 32 - LOW
    zero = tl.full([], 0, tl.int32)                    # a runtime int32 0 (k or n may be compile-time 1)
    row = tl.program_id(0)
    n = _row_len(row, L, Tq, q0, RATIO)
    vrow = VAL + row.to(tl.int64) * sv
    obase = row.to(tl.int64) * so
    cbase = row.to(tl.int64) * CAND
    j = tl.arange(0, CAND)
    if n <= k:                                         # every visible entry is a pick: slot = column, rest -1
        path = zero
        for st in range(0, k, CAND):
            _take_all(vrow, st + j, n, k, OVAL, OIDX, obase)
    else:
        if n <= CAND:                                  # the row is its own candidate set
            path = zero + 1
            cnt = zero + n
            cnt_gt = zero
            tau = zero                                 # unused here: a compiled kernel names it on every path
            mj = j < n
            x = tl.load(vrow + j, mask=mj, other=0.0).to(tl.float32)
            ii = j
        else:
            # guess: NS blocks of SB entries spread over [0, n), the key of rank r among them
            sb = tl.arange(0, NS * SB)
            p = (sb // SB) * (n - SB) // (NS - 1) + sb % SB
            ss = _keys(tl.load(vrow + p).to(tl.float32), sb >= 0, LOW)
            r = tl.minimum((2 * k * NS * SB + n - 1) // n, NS * SB)
            offs = tl.arange(0, BLOCK)                 # the first block's load in flight during the bisection
            xn = tl.load(vrow + offs, mask=offs < n, other=0.0)
            tau = _kth_key(ss, r, NB)
            # sieve: the entries with key >= tau, in index order, to the program's scratch slots. Each step issues
            # the next block's load before it works on its own (Triton does not pipeline this loop: no async copies in
            # its TTGIR), so a load's latency overlaps the scan and stores of the block before
            cnt = zero
            cnt_gt = zero                              # keys > tau: counted below only when more than CAND passed
            for st in range(0, n, BLOCK):
                offs = st + tl.arange(0, BLOCK)
                mb = offs < n
                xb = xn.to(tl.float32)
                xn = tl.load(vrow + offs + BLOCK, mask=offs + BLOCK < n, other=0.0)
                sk = _keys(xb, mb, LOW)
                c = mb & (sk >= tau)
                pos = cnt + tl.cumsum(c.to(tl.int32), 0) - 1
                _scatter(CV + cbase + pos, xb, c & (pos < CAND), ASM)
                _scatter(CI + cbase + pos, offs, c & (pos < CAND), ASM)
                cnt += tl.sum(c.to(tl.int32), 0)
            tl.debug_barrier()                         # the scratch writes of every thread, before they are read
            path = zero + 2
            mj = j < cnt
            x = tl.load(CV + cbase + j, mask=mj, other=0.0)
            ii = tl.load(CI + cbase + j, mask=mj, other=0)
        if (cnt >= k) & (cnt <= CAND):                 # select among the candidates, in registers
            s = _keys(x, mj, LOW)
            t = _kth_key(s, k, NB)
            n_gt = tl.sum((s > t).to(tl.int32), 0)
            _store_picks(x, ii, s > t, mj & (s == t), zero, zero, n_gt, k, OVAL, OIDX, obase, ASM)
        else:                                          # the emit streamed over the row, after
            if cnt >= k:                               # more than CAND passed: keys > tau, one more pass (off
                cnt_gt = _count_from(vrow, n, tau, LOW, BLOCK, True)               # the common path)
            if (cnt_gt < k) & (cnt >= k):              # the k-th key is tau itself (entries tied in bulk at it)
                path = zero + 3
                t = tau
                n_gt = cnt_gt
            else:                                      # fallback: the bisection streamed over the row
                path = zero + 4
                t = tl.full([], -(1 << (NB - 1)), tl.int32)
                if _count_from(vrow, n, zero, LOW, BLOCK, False) >= k:                # the sign bit
                    t = zero
                for b in tl.static_range(NB - 2, -1, -1):                     # then every lower bit, MSB first
                    if _count_from(vrow, n, t | (1 << b), LOW, BLOCK, False) >= k:
                        t = t | (1 << b)
                n_gt = _count_from(vrow, n, t, LOW, BLOCK, True)                      # keys > t
            gt = zero
            eq = zero
            for st in range(0, n, BLOCK):
                offs = st + tl.arange(0, BLOCK)
                mb = offs < n
                xb = tl.load(vrow + offs, mask=mb, other=0.0).to(tl.float32)
                sk = _keys(xb, mb, LOW)
                gt, eq = _store_picks(xb, offs, sk > t, mb & (sk == t), gt, eq, n_gt, k, OVAL, OIDX, obase, ASM)
    tl.store(PATH + row, path)


def sieve_select(val: torch.Tensor, k: int, frontier: tuple[int, int, int] | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None, paths: torch.Tensor | None = None,
                 cand: int | None = None, samples: tuple[int, int] | None = None, block: int | None = None,
                 num_warps: int | None = None, asm_stores: bool | None = None):
    """Top-k of every row of val (R, L) fp32 or bf16 (last dim contiguous), 1 <= k <= L, in radix_select's slot
    order (module docstring). out: (vals, idx) (R, k) fp32 / int32 views to write into. paths: an (R,) int32 tensor
    for each row's path. cand (CAND, a power of two >= 2 k; default 2048 or 2k rounded up to a power of two, 64 in
    the interpreter), samples (NS, SB: powers of two, NS >= 2, NS SB <= CAND; default (16, 64), (4, 8) in the
    interpreter), block (entries per sieve step; default 2048, 64 in the interpreter): the tuning knobs. num_warps:
    default 8 (4 in the interpreter). asm_stores: the candidates' and picks' stores as inline PTX (select.py
    asm_stores_on)."""
    R, L, oval, oidx = rows_and_outputs("sieve_select", val, k, out)
    CAND = int(cand) if cand is not None else max(64 if INTERPRET else 2048, next_pow2(2 * k))
    NS, SB = samples if samples is not None else ((4, 8) if INTERPRET else (16, 64))
    BLOCK = int(block) if block is not None else (64 if INTERPRET else 2048)
    for name, v in (("cand", CAND), ("samples[0]", NS), ("samples[1]", SB), ("block", BLOCK)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"sieve_select: {name}={v}; allowed: a power of two")
    if CAND < 2 * k or NS < 2 or NS * SB > CAND:
        raise ValueError(f"sieve_select: cand={CAND}, samples=({NS}, {SB}) with k={k}; allowed: cand >= 2 k, "
                         f"samples[0] >= 2, samples[0] samples[1] <= cand")
    if paths is not None:
        check_device(paths)
        assert paths.shape == (R,) and paths.dtype == torch.int32, "sieve_select: paths must be an (R,) int32 tensor"
    if R == 0:
        return oval, oidx
    cv = torch.empty(R * CAND, dtype=torch.float32, device=val.device)     # the candidates' values and indices
    ci = torch.empty(R * CAND, dtype=torch.int32, device=val.device)
    path = paths if paths is not None else torch.empty(R, dtype=torch.int32, device=val.device)
    if num_warps is None:
        num_warps = 4 if INTERPRET else 8
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    _sieve_select[(R,)](val, cv, ci, oval, oidx, path, L, val.stride(0), oval.stride(0), Tq, q0, k, RATIO=ratio,
                        LOW=16 if val.dtype == torch.bfloat16 else 0, CAND=CAND, NS=NS, SB=SB, BLOCK=BLOCK,
                        ASM=asm_stores_on(asm_stores), num_warps=num_warps)
    return oval, oidx


__all__ = ["sieve_select"]
