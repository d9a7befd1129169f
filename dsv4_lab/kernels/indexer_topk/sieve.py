"""Sieve select: exact top-k of long score rows through a guessed threshold (docs/kernels.md §3).

    sieve_select(val, k, frontier=None, out=None, paths=None, programs=None) -> (vals (R, k) fp32, idx (R, k) int32)

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

Two launch forms, the same output:
    one program per row (programs=1; prefill: many rows): one launch; guess target 2k; the program sieves its
              whole row into its own CAND slots (counting the keys > tau in one more pass when more than CAND passed)
    split row (programs=P > 1; decode: one long row, which one program would stream alone): launch 1, grid (P, R):
              every program of a row draws the same sample and finds the same tau (the same arithmetic, so no
              program waits for another; only its top guess_bits = 16 key bits, the low ones 0: any tau works, and
              a coarse one takes half the bisection steps of an fp32 key, but ties in bulk at a key with low bits
              set then take the fallback instead of the ties path), guess target (k + CAND) / 2, and sieves its
              chunk of C entries into its own min(C, CAND) slots, storing its counts of keys >= tau and > tau
              (and tau). Launch 2, grid (R,): one program per row adds the counts; with k <= count <= CAND it
              gathers the candidates in index order (candidate j lies in the chunk p with pre_p <= j < pre_{p+1},
              pre the exclusive prefix sum of the counts, found by a binary search over pre) and selects among
              them in registers; otherwise the ties path or the fallback streamed over the row by that one
              program (slow: the rare path)
The guess's and the candidates' k-th keys: by bisection, one key bit per step, or (kth_bits 4 / 8) by a histogram
of that many key bits per step (rowselect.py _kth_key_hist). With the sample of NS SB = 4096 entries (split
default) and rank r ~ (k + CAND) / 2 NS SB / n, the count has a relative spread of about 1 / sqrt(r) over rows of
independent scores (r = 36 at k = 512, CAND = 4096, n = 256K: k and CAND both ~4.7 standard deviations from its
mean); single sampled entries keep that on scores correlated along the row (benchmarks/probe_sieve_guess.py).

Output: radix_select's (select.py), slot for slot: the entries above the k-th key in index order, then the
lowest-index entries equal to it in index order; -inf picks report index -1; a row with n <= k visible entries takes
them all in index order (slot = column; -1 / -inf after). frontier as in select.py. `paths` (R,) int32, if given,
receives each row's path: 0 all taken (n <= k), 1 own candidates (n <= CAND), 2 sieve, 3 ties, 4 fallback.
Deterministic (no atomics), no host synchronisation, CUDA-graph safe; scratch R x CAND x 8 bytes (split: R x P x
min(C, CAND) x 8 bytes and 3 R P counts).
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, next_pow2, tl, triton
from .rowselect import _keys, _kth_key, _kth_key_hist
from .select import (_row_len, _scatter, _store_picks, _take_all, asm_stores_on, chunks, default_programs,
                     rows_and_outputs)


# ------------------------------------------------------------------------------------------------ shared steps
@triton.jit
def _sample(vrow, n, target, LOW: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr):
    """The guess's sample: the keys of NS blocks of SB contiguous entries spread over [0, n) (n >= NS SB), and the
    rank r = ceil(target NS SB / n) whose key is the guess."""
    sb = tl.arange(0, NS * SB)
    p = (sb // SB).to(tl.int64) * (n - SB) // (NS - 1) + sb % SB
    ss = _keys(tl.load(vrow + p).to(tl.float32), sb >= 0, LOW)
    r = tl.minimum((target * NS * SB + n - 1) // n, NS * SB)
    return ss, r


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
def _kth(s, k, NB: tl.constexpr, KB: tl.constexpr):
    """The k-th largest of the NB-bit keys s: by bisection, one bit per step (KB 0), or KB bits per step from
    histograms (rowselect.py _kth_key_hist)."""
    if KB == 0:
        t = _kth_key(s, k, NB)
    else:
        t = _kth_key_hist(s, k, NB, KB)
    return t


@triton.jit
def _select_candidates(x, ii, mj, k, OVAL, OIDX, obase, LOW: tl.constexpr, ASM: tl.constexpr, KB: tl.constexpr):
    """The row's picks from its candidates in registers (values x, row indices ii, in index order; mj: the live
    slots), k <= #candidates: the k-th key (_kth), then the emit."""
    zero = tl.full([], 0, tl.int32)
    s = _keys(x, mj, LOW)
    t = _kth(s, k, 32 - LOW, KB)
    n_gt = tl.sum((s > t).to(tl.int32), 0)
    _store_picks(x, ii, s > t, mj & (s == t), zero, zero, n_gt, k, OVAL, OIDX, obase, ASM)


@triton.jit
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


@triton.jit
def _sieve_chunk(vrow, c0, c1, tau, xn, CV, CI, cbase, cap, LOW: tl.constexpr, BLOCK: tl.constexpr,
                 ASM: tl.constexpr, GT: tl.constexpr):
    """Entries [c0, c1) with key >= tau, in index order, to slots cbase, cbase + 1, .. (the first `cap` of them).
    xn: the first block, already loaded. Each step issues the next block's load before it works on its own (Triton
    does not pipeline this loop: no async copies in its TTGIR), so a load's latency overlaps the scan and stores of
    the block before. Returns (#keys >= tau, GT: #keys > tau, else 0)."""
    cnt = tl.full([], 0, tl.int32)
    cnt_gt = tl.full([], 0, tl.int32)
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
        if GT:
            cnt_gt += tl.sum((sk > tau).to(tl.int32), 0)                      # (masked keys are below tau)
    return cnt, cnt_gt


@triton.jit
def _take_row(vrow, n, k, OVAL, OIDX, obase, CAND: tl.constexpr):
    """A row with n <= k visible entries: every one is a pick (slot = column), -1 / -inf in the slots after."""
    j = tl.arange(0, CAND)
    for st in range(0, k, CAND):
        _take_all(vrow, st + j, n, k, OVAL, OIDX, obase)


@triton.jit
def _whole_row(vrow, n, CAND: tl.constexpr):
    """A row of n <= CAND visible entries as its own candidate set: (values (CAND,) fp32, live slots)."""
    j = tl.arange(0, CAND)
    mj = j < n
    return tl.load(vrow + j, mask=mj, other=0.0).to(tl.float32), mj


# ------------------------------------------------------------------------------------------------ one program per row
@triton.jit
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
            cnt, _ = _sieve_chunk(vrow, 0, n, tau, xn, CV, CI, cbase, CAND, LOW, BLOCK, ASM, False)
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


# ------------------------------------------------------------------------------------------------ split row
@triton.jit
def _sieve_split(VAL, CNT, CV, CI, L, C, P, RC, sv, Tq, q0, k, RATIO: tl.constexpr, LOW: tl.constexpr,
                 CAND: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr, BLOCK: tl.constexpr, GB: tl.constexpr,
                 ASM: tl.constexpr, KB: tl.constexpr):
    """Launch 1 of the split form, program p of row `row` (grid (P, R)): the row's guess (its GB top key bits),
    then its chunk [p C, (p + 1) C) sieved into its RC slots; CNT[row] = (counts >= tau, counts > tau, tau) of the
    row's P programs."""
    GSH: tl.constexpr = 32 - LOW - GB                  # key bits below the guess's GB
    p = tl.program_id(0)
    row = tl.program_id(1)
    n = _row_len(row, L, Tq, q0, RATIO)
    c0 = p * C
    cnt = tl.full([], 0, tl.int32)
    cnt_gt = tl.full([], 0, tl.int32)
    tau = tl.full([], 0, tl.int32)
    if (n > CAND) & (c0 < n):                          # (shorter rows: the merge takes them whole)
        vrow = VAL + row.to(tl.int64) * sv
        c1 = tl.minimum(c0 + C, n)
        ss, r = _sample(vrow, n, (k + CAND) // 2, LOW, NS, SB)
        offs = c0 + tl.arange(0, BLOCK)                # the chunk's first block in flight during the bisection
        xn = tl.load(vrow + offs, mask=offs < c1, other=0.0)
        tau = _kth(ss >> GSH, r, GB, KB) << GSH
        cnt, cnt_gt = _sieve_chunk(vrow, c0, c1, tau, xn, CV, CI, (row.to(tl.int64) * P + p) * RC, RC, LOW, BLOCK,
                                   ASM, True)
    cb = CNT + row.to(tl.int64) * 3 * P + p
    tl.store(cb, cnt)
    tl.store(cb + P, cnt_gt)
    tl.store(cb + 2 * P, tau)


@triton.jit
def _sieve_merge(VAL, CNT, CV, CI, OVAL, OIDX, PATH, L, P, RC, sv, so, Tq, q0, k, RATIO: tl.constexpr,
                 LOW: tl.constexpr, CAND: tl.constexpr, PB: tl.constexpr, LOGPB: tl.constexpr, BLOCK: tl.constexpr,
                 ASM: tl.constexpr, KB: tl.constexpr):
    """Launch 2 of the split form, one program per row (grid (R,)): the row's candidates from its P chunks'
    slots, in index order, then the select in registers (or the ties path / fallback streamed)."""
    zero = tl.full([], 0, tl.int32)
    row = tl.program_id(0)
    n = _row_len(row, L, Tq, q0, RATIO)
    vrow = VAL + row.to(tl.int64) * sv
    obase = row.to(tl.int64) * so
    j = tl.arange(0, CAND)
    if n <= k:                                         # every visible entry is a pick: slot = column, rest -1
        path = zero
        _take_row(vrow, n, k, OVAL, OIDX, obase, CAND)
    else:
        if n <= CAND:                                  # the row is its own candidate set
            path = zero + 1
            cnt = zero + n
            cnt_gt = zero
            tau = zero
            x, mj = _whole_row(vrow, n, CAND)
            ii = j
        else:
            path = zero + 2
            cb = CNT + row.to(tl.int64) * 3 * P
            q = tl.arange(0, PB)
            c = tl.load(cb + q, mask=q < P, other=0)
            cnt = tl.sum(c, 0)
            cnt_gt = tl.sum(tl.load(cb + P + q, mask=q < P, other=0), 0)
            tau = tl.load(cb + 2 * P)                  # program 0's (every program found the same)
            mj = (j < cnt) & (cnt <= CAND)
            x = tl.zeros([CAND], tl.float32)
            ii = tl.zeros([CAND], tl.int32)
            if (cnt >= k) & (cnt <= CAND):
                # the exclusive prefix sums pre_p of the counts, then for each candidate j the last chunk p with
                # pre_p <= j (pre is non-decreasing: binary lifting, LOGPB steps, each a gather from the PB prefix
                # sums held in registers, not a read of memory)
                pre = tl.cumsum(c, 0) - c
                lo = tl.zeros([CAND], tl.int32)
                for s in tl.static_range(LOGPB - 1, -1, -1):
                    nxt = lo + (1 << s)
                    ok = (nxt < P) & (tl.gather(pre, tl.minimum(nxt, PB - 1), 0) <= j)
                    lo = tl.where(ok, nxt, lo)
                slot = (row.to(tl.int64) * P + lo) * RC + (j - tl.gather(pre, lo, 0))
                x = tl.load(CV + slot, mask=mj, other=0.0)
                ii = tl.load(CI + slot, mask=mj, other=0)
        if (cnt >= k) & (cnt <= CAND):                 # select among the candidates, in registers
            _select_candidates(x, ii, mj, k, OVAL, OIDX, obase, LOW, ASM, KB)
        else:                                          # the emit streamed over the row by this one program
            path = _stream_emit(vrow, n, k, tau, cnt, cnt_gt, OVAL, OIDX, obase, LOW, BLOCK, ASM)
    tl.store(PATH + row, path)


def _pow2(name: str, v: int) -> int:
    if v < 1 or v & (v - 1):
        raise ValueError(f"sieve_select: {name}={v}; allowed: a power of two")
    return v


def sieve_select(val: torch.Tensor, k: int, frontier: tuple[int, int, int] | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None, paths: torch.Tensor | None = None,
                 cand: int | None = None, samples: tuple[int, int] | None = None, block: int | None = None,
                 num_warps: int | None = None, asm_stores: bool | None = None, programs: int | None = None,
                 guess_bits: int = 16, merge_warps: int | None = None, kth_bits: int = 0):
    """Top-k of every row of val (R, L) fp32 or bf16 (last dim contiguous), 1 <= k <= L, in radix_select's slot
    order (module docstring). out: (vals, idx) (R, k) fp32 / int32 views to write into. paths: an (R,) int32 tensor
    for each row's path. programs: programs per row (1: one launch; > 1: the split form; default
    select.default_programs: split where there are few rows, rows longer than CAND only).
    The tuning knobs: cand (CAND, a power of two >= 2 k; default 2048 or 2k rounded up to a power of two, split form
    4096 or 8k so rounded; 64 in the interpreter), samples (NS, SB: powers of two, NS >= 2, NS SB <= CAND;
    default (16, 64), split form (4096, 1); (4, 8) in the interpreter), block (entries per sieve step; default 2048,
    64 in the interpreter; the split form's chunks are whole blocks), guess_bits (the split form's guess: its top
    key bits, 1..16 for bf16 rows, 1..32 for fp32; the rest 0). num_warps: default 8 (4 in the interpreter);
    asm_stores: the candidates' and picks' stores as inline PTX (select.py asm_stores_on); merge_warps: the split
    form's second launch (default 16: one program per row holding CAND candidates, spread over more threads;
    registers and spills by warps: benchmarks/kernel_registers.py `sieve_split`). kth_bits: how the guess and the
    candidates' k-th key are found, 0 by bisection (one key bit per step), 4 or 8 by histograms of that many key bits
    per step (rowselect.py _kth_key_hist; guess_bits must then be a multiple of it)."""
    R, L, oval, oidx = rows_and_outputs("sieve_select", val, k, out)
    if programs is not None and int(programs) < 1:
        raise ValueError(f"sieve_select: programs={programs}; allowed: >= 1")
    BLOCK = _pow2("block", int(block) if block is not None else (64 if INTERPRET else 2048))
    P, C = chunks(L, default_programs(R, L) if programs is None else int(programs), BLOCK)
    split = P > 1
    dcand = max(4096, next_pow2(8 * k)) if split else max(2048, next_pow2(2 * k))
    CAND = _pow2("cand", int(cand) if cand is not None else (64 if INTERPRET else dcand))
    NS, SB = samples if samples is not None else ((4, 8) if INTERPRET else (4096, 1) if split else (16, 64))
    _pow2("samples[0]", NS), _pow2("samples[1]", SB)
    if CAND < 2 * k or NS < 2 or NS * SB > CAND:
        raise ValueError(f"sieve_select: cand={CAND}, samples=({NS}, {SB}) with k={k}; allowed: cand >= 2 k, "
                         f"samples[0] >= 2, samples[0] samples[1] <= cand")
    low = 16 if val.dtype == torch.bfloat16 else 0
    if not 1 <= guess_bits <= 32 - low:
        raise ValueError(f"sieve_select: guess_bits={guess_bits}; allowed: 1..{32 - low} for {val.dtype} rows")
    if kth_bits not in (0, 4, 8) or (kth_bits and guess_bits % kth_bits):
        raise ValueError(f"sieve_select: kth_bits={kth_bits} with guess_bits={guess_bits}; allowed: 0, 4, 8 (a "
                         "divisor of guess_bits)")
    if paths is not None:
        check_device(paths)
        assert paths.shape == (R,) and paths.dtype == torch.int32, "sieve_select: paths must be an (R,) int32 tensor"
    if R == 0:
        return oval, oidx
    path = paths if paths is not None else torch.empty(R, dtype=torch.int32, device=val.device)
    if num_warps is None:
        num_warps = 4 if INTERPRET else 8
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    if not split:
        cv = torch.empty(R * CAND, dtype=torch.float32, device=val.device)     # the candidates' values and indices
        ci = torch.empty(R * CAND, dtype=torch.int32, device=val.device)
        _sieve_select[(R,)](val, cv, ci, oval, oidx, path, L, val.stride(0), oval.stride(0), Tq, q0, k,
                            RATIO=ratio, LOW=low, CAND=CAND, NS=NS, SB=SB, BLOCK=BLOCK,
                            ASM=asm_stores_on(asm_stores), KB=kth_bits, num_warps=num_warps)
        return oval, oidx
    RC = min(C, CAND)                                  # a chunk's slots: more than CAND candidates are never read
    cnt = torch.empty(R * 3 * P, dtype=torch.int32, device=val.device)
    cv = torch.empty(R * P * RC, dtype=torch.float32, device=val.device)
    ci = torch.empty(R * P * RC, dtype=torch.int32, device=val.device)
    asm = asm_stores_on(asm_stores)
    _sieve_split[(P, R)](val, cnt, cv, ci, L, C, P, RC, val.stride(0), Tq, q0, k, RATIO=ratio, LOW=low, CAND=CAND,
                         NS=NS, SB=SB, BLOCK=BLOCK, GB=min(guess_bits, 32 - low), ASM=asm, KB=kth_bits,
                         num_warps=num_warps)
    PB = next_pow2(P)
    _sieve_merge[(R,)](val, cnt, cv, ci, oval, oidx, path, L, P, RC, val.stride(0), oval.stride(0), Tq, q0, k,
                       RATIO=ratio, LOW=low, CAND=CAND, PB=PB, LOGPB=PB.bit_length() - 1, BLOCK=BLOCK, ASM=asm,
                       KB=kth_bits, num_warps=(4 if INTERPRET else 16) if merge_warps is None else int(merge_warps))
    return oval, oidx


__all__ = ["sieve_select"]
