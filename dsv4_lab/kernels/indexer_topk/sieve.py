"""Sieve select: exact top-k of long score rows through a guessed threshold (docs/kernels.md §3).

    sieve_select(val, k, frontier=None, out=None, paths=None) -> (vals (R, k) fp32, idx (R, k) int32)

For rows too long for one program's registers (rowselect.py holds at most MAX_L entries, and spills well before
that). Keys are rowselect.py's (signed int32, the low 16 bits dropped for bf16 rows).

    guess     NS blocks of SB contiguous entries spread over the row's n visible entries (NS SB keys, read once) and
              the key tau of rank r = ceil(target NS SB / n) among them, by bisection on the key bits: about
              `target` of the row's entries should have a key >= tau
    sieve     the row in blocks of BLOCK entries: the entries with key >= tau go, in index order, to scratch slots
              (value and index), and are counted
    select    if k <= count <= CAND, the top-k of the row are the top-k of the candidates (every other entry has a
              key below tau, and tau is at most every candidate's key, so all entries tied at the k-th key are
              candidates): the row select on the candidates in registers (the k-th key by bisection, then the emit)
    ties      if more than CAND entries passed but fewer than k lie strictly above tau (entries tied in bulk at the
              guess), tau is the k-th key itself: the emit streamed over the row
    fallback  otherwise (a guess that let fewer than k entries through, or more than CAND above it: scores whose
              order follows their position), the same bisection streamed over the whole row, one pass per key bit,
              then the emit streamed
Rows with at most CAND visible entries are their own candidates (no guess, no sieve).

One program per row, one launch (many rows: prefill): guess target 2k; the program sieves its whole row into its
own CAND slots (counting the keys > tau in one more pass when more than CAND passed). A decode row (one long row)
takes the tail select or radix_select instead (tailselect.py, select.py: the row split over many programs); a split
form of this sieve (every program of the row drawing the same sample and sieving its chunk, then one program per row
selecting among the candidates) measured slower there for both row dtypes and was removed (benchmarks/README.md,
"Removed indexer top-k variants").
The guess's and the candidates' k-th keys: by bisection, one key bit per step, or (kth_bits 4 / 8) by a histogram
of that many key bits per step (rowselect.py _kth_key_hist). With NS SB sampled entries and rank r ~ 2k NS SB / n,
the count that passes has a relative spread of about 1 / sqrt(r) over rows of independent scores.

Output: radix_select's (select.py), slot for slot: the entries above the k-th key in index order, then the
lowest-index entries equal to it in index order; -inf picks report index -1; a row with n <= k visible entries takes
them all in index order (slot = column; -1 / -inf after). frontier as in select.py. `paths` (R,) int32, if given,
receives each row's path: 0 all taken (n <= k), 1 own candidates (n <= CAND), 2 sieve, 3 ties, 4 fallback.
Deterministic (no atomics), no host synchronisation, CUDA-graph safe; scratch R x CAND x 8 bytes.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, jit, next_pow2, tl, triton
from .rowselect import _keys, _kth_key, _kth_key_hist
from .select import _row_len, _scatter, _store_picks, _take_all, asm_stores_on, rows_and_outputs


# ------------------------------------------------------------------------------------------------ shared steps
@jit
def _sample(vrow, n, target, LOW: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr):
    """The guess's sample: the keys of NS blocks of SB contiguous entries spread over [0, n) (n >= NS SB), and the
    rank r = ceil(target NS SB / n) whose key is the guess."""
    sb = tl.arange(0, NS * SB)
    p = (sb // SB).to(tl.int64) * (n - SB) // (NS - 1) + sb % SB
    ss = _keys(tl.load(vrow + p).to(tl.float32), sb >= 0, LOW)
    r = tl.minimum((target * NS * SB + n - 1) // n, NS * SB)
    return ss, r


@jit
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


@jit
def _kth(s, k, NB: tl.constexpr, KB: tl.constexpr):
    """The k-th largest of the NB-bit keys s: by bisection, one bit per step (KB 0), or KB bits per step from
    histograms (rowselect.py _kth_key_hist)."""
    if KB == 0:
        t = _kth_key(s, k, NB)
    else:
        t = _kth_key_hist(s, k, NB, KB)
    return t


@jit
def _select_candidates(x, ii, mj, k, OVAL, OIDX, obase, LOW: tl.constexpr, ASM: tl.constexpr, KB: tl.constexpr):
    """The row's picks from its candidates in registers (values x, row indices ii, in index order; mj: the live
    slots), k <= #candidates: the k-th key (_kth), then the emit."""
    zero = tl.full([], 0, tl.int32)
    s = _keys(x, mj, LOW)
    t = _kth(s, k, 32 - LOW, KB)
    n_gt = tl.sum((s > t).to(tl.int32), 0)
    _store_picks(x, ii, s > t, mj & (s == t), zero, zero, n_gt, k, OVAL, OIDX, obase, ASM)


@jit
def _stream_emit(vrow, n, k, tau, cnt, cnt_gt, OVAL, OIDX, obase, LOW: tl.constexpr, BLOCK: tl.constexpr,
                 ASM: tl.constexpr):
    """The picks when the candidates cannot be selected in registers (cnt entries >= tau, cnt_gt > tau; cnt_gt is
    only read when cnt >= k), streamed over the row's n entries. Returns the path (3 ties, 4 fallback)."""
    zero = tl.full([], 0, tl.int32)
    NB: tl.constexpr = 32 - LOW
    if (cnt_gt < k) & (cnt >= k):                  # the k-th key is tau itself (entries tied in bulk at it)
        path = zero + 3
        t = tau
        n_gt = cnt_gt
    else:                                          # fallback: the bisection streamed over the row
        path = zero + 4
        t = tl.full([], -(1 << (NB - 1)), tl.int32)
        if _count_from(vrow, n, zero, LOW, BLOCK, False) >= k:                        # the sign bit
            t = zero
        for b in tl.static_range(NB - 2, -1, -1):                             # then every lower bit, MSB first
            if _count_from(vrow, n, t | (1 << b), LOW, BLOCK, False) >= k:
                t = t | (1 << b)
        n_gt = _count_from(vrow, n, t, LOW, BLOCK, True)                              # keys > t
    gt = zero
    eq = zero
    for st in range(0, n, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        mb = offs < n
        xb = tl.load(vrow + offs, mask=mb, other=0.0).to(tl.float32)
        sk = _keys(xb, mb, LOW)
        gt, eq = _store_picks(xb, offs, sk > t, mb & (sk == t), gt, eq, n_gt, k, OVAL, OIDX, obase, ASM)
    return path


@jit
def _sieve_chunk(vrow, c0, c1, tau, xn, CV, CI, cbase, cap, LOW: tl.constexpr, BLOCK: tl.constexpr,
                 ASM: tl.constexpr):
    """Entries [c0, c1) with key >= tau, in index order, to slots cbase, cbase + 1, .. (the first `cap` of them).
    xn: the first block, already loaded. Each step issues the next block's load before it works on its own (Triton
    does not pipeline this loop: no async copies in its TTGIR), so a load's latency overlaps the scan and stores of
    the block before. Returns #keys >= tau."""
    cnt = tl.full([], 0, tl.int32)
    for st in range(c0, c1, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        mb = offs < c1
        xb = xn.to(tl.float32)
        xn = tl.load(vrow + offs + BLOCK, mask=offs + BLOCK < c1, other=0.0)
        sk = _keys(xb, mb, LOW)
        c = mb & (sk >= tau)
        pos = cnt + tl.cumsum(c.to(tl.int32), 0) - 1
        _scatter(CV + cbase + pos, xb, c & (pos < cap), ASM)
        _scatter(CI + cbase + pos, offs, c & (pos < cap), ASM)
        cnt += tl.sum(c.to(tl.int32), 0)
    return cnt


@jit
def _take_row(vrow, n, k, OVAL, OIDX, obase, CAND: tl.constexpr):
    """A row with n <= k visible entries: every one is a pick (slot = column), -1 / -inf in the slots after."""
    j = tl.arange(0, CAND)
    for st in range(0, k, CAND):
        _take_all(vrow, st + j, n, k, OVAL, OIDX, obase)


@jit
def _whole_row(vrow, n, CAND: tl.constexpr):
    """A row of n <= CAND visible entries as its own candidate set: (values (CAND,) fp32, live slots)."""
    j = tl.arange(0, CAND)
    mj = j < n
    return tl.load(vrow + j, mask=mj, other=0.0).to(tl.float32), mj


@jit
def _sieve_select(VAL, CV, CI, OVAL, OIDX, PATH, L, sv, so, Tq, q0, k, RATIO: tl.constexpr, LOW: tl.constexpr,
                  CAND: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr,
                  KB: tl.constexpr):
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
        _take_row(vrow, n, k, OVAL, OIDX, obase, CAND)
    else:
        if n <= CAND:                                  # the row is its own candidate set
            path = zero + 1
            cnt = zero + n
            tau = zero                                 # unused here: a compiled kernel names it on every path
            x, mj = _whole_row(vrow, n, CAND)
            ii = j
        else:
            ss, r = _sample(vrow, n, 2 * k, LOW, NS, SB)          # guess: the key of rank r among the sample
            offs = tl.arange(0, BLOCK)                 # the first block's load in flight during the bisection
            xn = tl.load(vrow + offs, mask=offs < n, other=0.0)
            tau = _kth(ss, r, NB, KB)
            cnt = _sieve_chunk(vrow, 0, n, tau, xn, CV, CI, cbase, CAND, LOW, BLOCK, ASM)
            tl.debug_barrier()                         # the scratch writes of every thread, before they are read
            path = zero + 2
            mj = j < cnt
            x = tl.load(CV + cbase + j, mask=mj, other=0.0)
            ii = tl.load(CI + cbase + j, mask=mj, other=0)
        if (cnt >= k) & (cnt <= CAND):                 # select among the candidates, in registers
            _select_candidates(x, ii, mj, k, OVAL, OIDX, obase, LOW, ASM, KB)
        else:                                          # the emit streamed over the row, after
            cnt_gt = zero
            if cnt >= k:                               # more than CAND passed: keys > tau, one more pass (off
                cnt_gt = _count_from(vrow, n, tau, LOW, BLOCK, True)               # the common path)
            path = _stream_emit(vrow, n, k, tau, cnt, cnt_gt, OVAL, OIDX, obase, LOW, BLOCK, ASM)
    tl.store(PATH + row, path)


def _pow2(name: str, v: int) -> int:
    if v < 1 or v & (v - 1):
        raise ValueError(f"sieve_select: {name}={v}; allowed: a power of two")
    return v


def sieve_select(val: torch.Tensor, k: int, frontier: tuple[int, int, int] | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None, paths: torch.Tensor | None = None,
                 cand: int | None = None, samples: tuple[int, int] | None = None, block: int | None = None,
                 num_warps: int | None = None, asm_stores: bool | None = None, kth_bits: int = 0):
    """Top-k of every row of val (R, L) fp32 or bf16 (last dim contiguous), 1 <= k <= L, in radix_select's slot
    order (module docstring), one program per row. out: (vals, idx) (R, k) fp32 / int32 views to write into. paths:
    an (R,) int32 tensor for each row's path.
    The tuning knobs: cand (CAND, a power of two >= 2 k; default 2048 or 2k rounded up to a power of two; 64 in the
    interpreter), samples (NS, SB: powers of two, NS >= 2, NS SB <= CAND; default (16, 64); (4, 8) in the
    interpreter), block (entries per sieve step; default 2048, 64 in the interpreter). num_warps: default 8 (4 in the
    interpreter); asm_stores: the candidates' and picks' stores as inline PTX (select.py asm_stores_on). kth_bits:
    how the guess and the candidates' k-th key are found, 0 by bisection (one key bit per step), 4 or 8 by
    histograms of that many key bits per step (rowselect.py _kth_key_hist)."""
    R, L, oval, oidx = rows_and_outputs("sieve_select", val, k, out)
    BLOCK = _pow2("block", int(block) if block is not None else (64 if INTERPRET else 2048))
    CAND = _pow2("cand", int(cand) if cand is not None else (64 if INTERPRET else max(2048, next_pow2(2 * k))))
    NS, SB = samples if samples is not None else ((4, 8) if INTERPRET else (16, 64))
    _pow2("samples[0]", NS), _pow2("samples[1]", SB)
    if CAND < 2 * k or NS < 2 or NS * SB > CAND:
        raise ValueError(f"sieve_select: cand={CAND}, samples=({NS}, {SB}) with k={k}; allowed: cand >= 2 k, "
                         f"samples[0] >= 2, samples[0] samples[1] <= cand")
    low = 16 if val.dtype == torch.bfloat16 else 0
    if kth_bits not in (0, 4, 8):
        raise ValueError(f"sieve_select: kth_bits={kth_bits}; allowed: 0, 4, 8")
    if paths is not None:
        check_device(paths)
        assert paths.shape == (R,) and paths.dtype == torch.int32, "sieve_select: paths must be an (R,) int32 tensor"
    if R == 0:
        return oval, oidx
    path = paths if paths is not None else torch.empty(R, dtype=torch.int32, device=val.device)
    if num_warps is None:
        num_warps = 4 if INTERPRET else 8
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    cv = torch.empty(R * CAND, dtype=torch.float32, device=val.device)         # the candidates' values and indices
    ci = torch.empty(R * CAND, dtype=torch.int32, device=val.device)
    _sieve_select[(R,)](val, cv, ci, oval, oidx, path, L, val.stride(0), oval.stride(0), Tq, q0, k,
                        RATIO=ratio, LOW=low, CAND=CAND, NS=NS, SB=SB, BLOCK=BLOCK,
                        ASM=asm_stores_on(asm_stores), KB=kth_bits, num_warps=num_warps)
    return oval, oidx


__all__ = ["sieve_select"]
