"""Tail select: exact top-k of fp32 rows in three launches (or one, with grid barriers), radix digits over the top 16
key bits and an exact tail (docs/kernels.md §3).

    tail_select(val, k, frontier=None, out=None, programs=None) -> (vals (R, k) fp32, idx (R, k) int32)

radix_select (select.py) finds the k-th largest key t of an fp32 row 8 bits per launch: four digit launches and the
emit. A decode row is latency-bound, so each launch costs about as much as the next whatever its work. Here the
digit launches stop after 16 bits (select.py's _hist_level with NL = 2, the bf16 select's two digits, on the fp32
keys): they fix t16, the top 16 bits of t, and krem = how many picks lie in the bucket (the entries whose key has
the top 16 bits t16). On a 256K row of N(0, 1) scores the bucket holds ~24 entries (docs/kernels.md §3). Then
one launch, P programs per row as before:

    emit    program p picks digit 1 (t16, krem: select.py _prefix), counts from the suffix counts of the programs
            before it (select.py's emit) how many entries above the bucket (key16 > t16: picks whatever t's low
            bits) and in the bucket lie before its chunk, and walks its chunk in index order: entries above the
            bucket to TEMP slots (the row's n16 = k - krem of them, in index order), the bucket's entries to BUCK
            slots (in index order; the row's first CAP). Then it takes the row's ticket (a CTA barrier, then one
            acquire-release atomic add: its stores come before it).
    tail    the row's last program to take a ticket sees every other program's stores. With the bucket's size nB
            (histogram 1's bin of t16) at most CAP, it holds the bucket in registers (a tile of SMALL entries when
            nB <= SMALL, as on a 256K N(0, 1) row, else of CAP: each step below costs with the tile's size) and
            finds t's low 16 bits among them: in a tile of at most 64 entries as the largest low part with at least
            krem entries at or above it (each entry's count from one tile x tile compare), in a larger one by
            bisection (16 steps); the picks are the TEMP entries, the bucket entries > t and the r lowest-index
            bucket entries == t (r = krem - bucket entries > t). It writes them in radix_select's slot order: the
            entries > t in index order (a TEMP entry's slot is its TEMP slot plus the bucket entries > t with a
            lower index, a bucket entry's its rank among those plus the TEMP entries with a lower index), then the
            ties. The walk knows both lists' running counts, so it stores beside each entry how many of the other
            list's entries come before it (TC / BC); the tail reads those with the lists and needs one tl.gather
            (the bucket's picks > t among the bucket entries before a TEMP entry). With nB > CAP (many entries
            sharing their top 16 bits at the threshold, as in a row of ties) it finds t's low 16 bits by two 8-bit
            histograms streamed over the row, then writes every pick streaming over the row (one program: slow,
            exact). Then it zeroes the row's table (select.py _clear_row).
    one launch  (one_launch=True; select.ONE_LAUNCH, the default where the programs fit) the digit launches and the
            emit in one launch, a grid barrier per row after each digit (select.py's one-launch select), every
            program resident at once (P R <= the SMs; a cooperative launch, select.COOPERATIVE). The barriers count
            on the row's ticket counter, so every program, also one past the row's entries, takes an emit ticket:
            the last of them, which reads t16, krem and nB itself, settles the tail and zeroes the table once no
            program can still be waiting at a barrier.

Output: radix_select's, slot for slot (select.py docstring: entries > t in index order, then the lowest-index
entries == t; -inf picks report -1; rows with n <= k visible entries take them all, slot = column). frontier as in
select.py. Deterministic: every position comes from counts, none from the order programs run. No host
synchronisation (CUDA-graph safe). Workspace: a select.SelectWorkspace (its tables left zeroed) and R (k + CAP)
(value, index, count) scratch slots.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, dep_wait, jit, next_pow2, pdl_modes, tl, triton
from .select import (SelectWorkspace, _arrive_and_wait, _chunk_at, _clear_row, _hist_body, _hist_level, _pick_bin,
                     _prefix, _row_base, _scatter, _store_picks, _take_chunk, _ukey, asm_stores_on, cooperative_on,
                     default_programs, level_chunks, one_launch_plan, pdl_on, rows_and_outputs)

# The default of tail_select's `pdl`: its emit and second digit launch start before the launch before them ends
# (programmatic dependent launch, select.py docstring), where _common.pdl_supported. On: the same picks, bit for bit,
# and a 256K row measured faster with it (benchmarks/README.md T5).
PDL = True
# The one-launch tail select's register ceiling with the inline stores (maxnreg): left to itself ptxas compiled it
# from digit 0 to 126 registers, but from digit 1 to 128 with 20 bytes of spill stores; under this ceiling to 128 /
# 126 and no spills, two programs to an SM (benchmarks/kernel_registers.py tail_one_launch; sm_90, 8 warps).
ONE_LAUNCH_MAXNREG = 128


@jit
def _tail_fast(TV, TI, BV, BI, TC, BC, OVAL, OIDX, tb, bb, obase, nB, n16, krem, KP: tl.constexpr, CAP: tl.constexpr,
               ASM: tl.constexpr):
    """The row's picks from TEMP (n16 entries above the bucket) and the bucket (nB <= CAP entries), both in index
    order: t's low 16 bits (the krem-th largest low part: in a tile of at most 64 entries from each entry's count of
    entries >= it, one (CAP, CAP) compare; in a larger one by bisection), then every pick at its slot from TC /
    BC, the other list's entries before each entry (module docstring)."""
    BIG: tl.constexpr = 2147483647
    j = tl.arange(0, CAP)
    mb = j < nB
    bv = tl.load(BV + bb + j, mask=mb, other=0.0, volatile=True)
    bi = tl.load(BI + bb + j, mask=mb, other=BIG, volatile=True)
    jc = tl.arange(0, KP)
    mc = jc < n16
    cv = tl.load(TV + tb + jc, mask=mc, other=0.0, volatile=True)
    ci = tl.load(TI + tb + jc, mask=mc, other=BIG, volatile=True)
    pos = tl.load(TC + tb + jc, mask=mc, other=0, volatile=True)          # bucket entries before each TEMP entry
    below_b = tl.load(BC + bb + j, mask=mb, other=0, volatile=True)       # TEMP entries before each bucket entry
    low = tl.where(mb, _ukey(bv) & 0xFFFF, -1)                  # the bucket's keys share t16: their low 16 bits
    if CAP <= 64:          # the largest low part with >= krem entries at or above it (krem >= 1: the bucket holds t)
        ge = tl.sum((low[None, :] >= low[:, None]).to(tl.int32), 1)          # (CAP,) entries >= each entry
        tl16 = tl.max(tl.where(mb & (ge >= krem), low, -1), 0)
    else:
        tl16 = krem * 0
        for b in tl.static_range(15, -1, -1):                  # the krem-th largest low part, MSB first
            cand = tl16 | (1 << b)
            if tl.sum((low >= cand).to(tl.int32), 0) >= krem:
                tl16 = cand
    g = low > tl16                                             # bucket picks > t
    e = low == tl16                                            # bucket entries == t
    gcum = tl.cumsum(g.to(tl.int32), 0)
    nbg = tl.sum(g.to(tl.int32), 0)
    # TEMP entry j: its slot is j + the bucket picks > t with a lower index (of the pos bucket entries before it)
    slot_c = jc + tl.where(pos > 0, tl.gather(gcum, tl.maximum(pos - 1, 0), 0), 0)
    _scatter(OVAL + obase + slot_c, cv, mc, ASM)
    _scatter(OIDX + obase + slot_c, tl.where(cv == float("-inf"), -1, ci), mc, ASM)
    # bucket pick > t: its rank among them + the TEMP entries with a lower index
    slot_b = gcum - 1 + below_b
    _scatter(OVAL + obase + slot_b, bv, g, ASM)
    _scatter(OIDX + obase + slot_b, tl.where(bv == float("-inf"), -1, bi), g, ASM)
    # the r = krem - nbg lowest-index bucket entries == t, after every pick > t
    rank = tl.cumsum(e.to(tl.int32), 0) - 1
    take = e & (rank < krem - nbg)
    slot_t = n16 + nbg + rank
    _scatter(OVAL + obase + slot_t, bv, take, ASM)
    _scatter(OIDX + obase + slot_t, tl.where(bv == float("-inf"), -1, bi), take, ASM)


@jit
def _tail_streamed(vrow, n, pref, krem, k, OVAL, OIDX, obase, BLOCK: tl.constexpr, ASM: tl.constexpr):
    """The bucket too large for registers: t's digits 2 and 3 by histograms streamed over the row's n entries (the
    entries whose key has the digits found so far), then the emit streamed over the row, one program."""
    bins = tl.arange(0, 256)
    for lev in tl.static_range(2, 4):
        SH = 32 - 8 * (lev + 1)
        hist = tl.zeros([256], tl.int32)
        for st in range(0, n, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < n
            u = _ukey(tl.load(vrow + offs, mask=m, other=0.0))
            m = m & ((u >> (SH + 8)) == (pref >> (SH + 8)))
            hist += tl.histogram((u >> SH) & 255, 256, mask=m)
        b, krem = _pick_bin(hist, bins, krem)
        pref = pref | (b << SH)
    t = pref ^ -2147483648                                    # full 32-bit keys: compared as signed
    gt = krem * 0
    eq = krem * 0
    for st in range(0, n, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(vrow + offs, mask=m, other=0.0)
        a = _ukey(v) ^ -2147483648
        gt, eq = _store_picks(v, offs, m & (a > t), m & (a == t), gt, eq, k - krem, k, OVAL, OIDX, obase, ASM)


@jit
def _emit_tail(VAL, HIST, PH, TV, TI, BV, BI, TC, BC, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, RATIO: tl.constexpr,
               BLOCK: tl.constexpr, QB: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, SMALL: tl.constexpr,
               ALL: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """The third launch (grid (P, R)): _emit_tail_body, no tickets taken before it. ALL: every program takes one
    (the one-launch select's rule, run here as its own launch under the interpreter). PDL: _common.pdl_modes."""
    _emit_tail_body(VAL, HIST, PH, TV, TI, BV, BI, TC, BC, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, tl.program_id(0),
                    tl.program_id(1), 0, RATIO, BLOCK, QB, KP, CAP, SMALL, ALL, ASM, PDL)


@jit
def _emit_tail_body(VAL, HIST, PH, TV, TI, BV, BI, TC, BC, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, p, row, TB,
                    RATIO: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr,
                    SMALL: tl.constexpr, ALL: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Program p of row `row` after both digits: its chunk to TEMP / BUCK, then the ticket; the last program's tail.
    Beside each TEMP / BUCK entry, TC / BC: how many entries of the other list come before it. The row's counter
    holds TB arrivals before this; ALL = False: the cdiv(n, C) programs with entries take a ticket each; ALL = True:
    all P programs take one, those without entries too (the one-launch select: every program has passed the row's
    grid barriers on the same counter before the last ticket clears it), and any of them may be the row's last, so
    each reads t16, krem and the bucket's size itself. PDL: _common.pdl_modes (0 where the caller is not a launch
    of its own)."""
    if PDL == 1:
        dep_wait()
    n, c0, vrow, obase = _chunk_at(VAL, L, C, sv, so, Tq, q0, p, row, RATIO)
    H: tl.constexpr = 2 * 256
    hbase = _row_base(row, 2, 8)
    if ALL:
        active = n > k
    else:
        active = c0 < n
    if n <= k:                                         # every visible entry is a pick: slot = column, rest -1
        if PDL == 2:
            dep_wait()
        _take_chunk(vrow, c0, C, n, k, OVAL, OIDX, obase, BLOCK)
        if ALL:                                        # the exit ticket: the last clears the barriers' counter
            tl.debug_barrier()
            if tl.atomic_add(HIST + hbase + H, 1, sem="acq_rel", scope="gpu") == TB + P - 1:
                _clear_row(HIST, hbase, 2, 8)
    elif active:                                       # c0 < n (ALL: also a program past the row's entries)
        c1 = tl.minimum(c0 + C, n)                     # (<= c0 for a program past them: no block to walk)
        x = tl.load(vrow + c0 + tl.arange(0, BLOCK), mask=c0 + tl.arange(0, BLOCK) < c1, other=0.0)
        if PDL == 2:
            dep_wait()
        pref, krem = _prefix(HIST, hbase, k, 2, 1, 2, 8)     # t16 (bits 31..16 of pref), picks left in the bucket
        b0 = (pref >> 24) & 255
        b1 = (pref >> 16) & 255
        t16 = (pref >> 16) & 0xFFFF
        # the bucket's size nB (histogram 1's bin of t16, complete since the launch before): read here, in flight
        # beside the suffix counts and the chunk's walk, not after the ticket, where the tail would wait for it
        nB = tl.load(HIST + hbase + 256 + b1, volatile=True)
        # above / in the bucket, chunks of programs 0..p-1: S_{q,0}[b0 + 1] + S_{q,1}[b1 + 1] / S_{q,1}[b1] -
        # S_{q,1}[b1 + 1] (histogram 1 counts only the entries of digit 0 = b0)
        ga = k * 0
        gb = k * 0
        for qs in range(0, tl.where(c0 < n, p, 0), QB):
            q = qs + tl.arange(0, QB)
            mq = q < p
            qrow = PH + (row.to(tl.int64) * (P - 1) + q) * H
            s0 = tl.load(qrow + b0 + 1, mask=mq & (b0 + 1 < 256), other=0, volatile=True)
            s1 = tl.load(qrow + 256 + b1 + 1, mask=mq & (b1 + 1 < 256), other=0, volatile=True)
            s1b = tl.load(qrow + 256 + b1, mask=mq, other=0, volatile=True)
            ga += tl.sum(s0 + s1, 0)
            gb += tl.sum(s1b - s1, 0)
        tb = row.to(tl.int64) * k
        bb = row.to(tl.int64) * CAP
        for st in range(c0, c1, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < c1
            xn = tl.load(vrow + offs + BLOCK, mask=offs + BLOCK < c1, other=0.0)       # the next block, ahead
            v = x.to(tl.float32)
            u16 = (_ukey(v) >> 16) & 0xFFFF
            above = m & (u16 > t16)
            inb = m & (u16 == t16)
            pa = ga + tl.cumsum(above.to(tl.int32), 0) - 1
            pb = gb + tl.cumsum(inb.to(tl.int32), 0) - 1
            _scatter(TV + tb + pa, v, above, ASM)
            _scatter(TI + tb + pa, offs, above, ASM)
            _scatter(BV + bb + pb, v, inb & (pb < CAP), ASM)
            _scatter(BI + bb + pb, offs, inb & (pb < CAP), ASM)
            _scatter(TC + tb + pa, pb + 1, above, ASM)          # the other list's entries before this one
            _scatter(BC + bb + pb, pa + 1, inb & (pb < CAP), ASM)
            ga += tl.sum(above.to(tl.int32), 0)
            gb += tl.sum(inb.to(tl.int32), 0)
            x = xn
        # ticket: this program's stores and table reads before it (barrier, then release); the row's last program
        # (acquire) reads every other one's stores
        tl.debug_barrier()
        if ALL:
            last = TB + P - 1
        else:
            last = TB + (n + C - 1) // C - 1
        if tl.atomic_add(HIST + hbase + H, 1, sem="acq_rel", scope="gpu") == last:
            if nB <= SMALL:                                                    # the usual bucket: a small tile
                _tail_fast(TV, TI, BV, BI, TC, BC, OVAL, OIDX, tb, bb, obase, nB, k - krem, krem, KP, SMALL, ASM)
            elif nB <= CAP:
                _tail_fast(TV, TI, BV, BI, TC, BC, OVAL, OIDX, tb, bb, obase, nB, k - krem, krem, KP, CAP, ASM)
            else:
                _tail_streamed(vrow, n, pref, krem, k, OVAL, OIDX, obase, BLOCK, ASM)
            _clear_row(HIST, hbase, 2, 8)
    elif PDL == 2:
        dep_wait()


@jit
def _tail_one_launch(VAL, HIST, PH, TV, TI, BV, BI, TC, BC, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k,
                     RATIO: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr,
                     SMALL: tl.constexpr, FIRST: tl.constexpr, ASM: tl.constexpr):
    """The whole tail select in one launch (grid (P, R), every program resident: P R <= SMs, launched cooperatively:
    select.COOPERATIVE): digits FIRST..1 (the ones before already counted), a grid barrier per row after each in
    place of the launch boundary (select._arrive_and_wait, on the row's ticket counter), then the emit with every
    program taking a ticket (_emit_tail_body ALL): the last one settles the tail and zeroes the table and the
    counter for the next call."""
    p = tl.program_id(0)
    row = tl.program_id(1)
    cnt = HIST + _row_base(row, 2, 8) + 2 * 256
    for lev in range(FIRST, 2):
        _hist_body(VAL, HIST, PH, L, C, P, sv, Tq, q0, k, lev, p, row, 2, 8, RATIO, BLOCK, 0)
        _arrive_and_wait(cnt, (lev - FIRST + 1) * P)
    _emit_tail_body(VAL, HIST, PH, TV, TI, BV, BI, TC, BC, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, p, row,
                    (2 - FIRST) * P, RATIO, BLOCK, QB, KP, CAP, SMALL, True, ASM, 0)


def tail_select(val: torch.Tensor, k: int, frontier: tuple[int, int, int] | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None, programs: int | None = None,
                workspace: SelectWorkspace | None = None, block: int | None = None, cap: int | None = None,
                small_cap: int | None = None, num_warps: int = 8, asm_stores: bool | None = None,
                first_level: int = 0, pdl: bool | None = None, one_launch: bool | None = None):
    """Top-k of every row of val (R, L) fp32 (last dim contiguous), 1 <= k <= L, radix_select's output slot for slot,
    in three launches or one (module docstring). programs: per row (default select.default_programs); workspace: a
    SelectWorkspace (one is allocated when None); block: entries per loop step (default 2048, 64 in the
    interpreter; chunks are whole blocks); cap (CAP): bucket entries the tail holds in registers, a power of two
    (default 1024, 16 in the interpreter); small_cap (SMALL): the smaller tile taken when the bucket fits it, a power
    of two <= cap (default min(64, cap)); out: (vals, idx) views to write into; asm_stores: select.asm_stores_on.
    first_level=1: digit 0 already counted into the workspace by the launch that wrote the rows, with NL = 2 tables
    (indexer_scores_triton level0 under triton.FP32_TAIL), over `programs` chunks of `block` entries: two launches.
    pdl: the launches start early, programmatic dependent launch (select.pdl_on; None: this module's PDL).
    one_launch: the digit launches and the emit as one launch (_tail_one_launch: a grid barrier per digit, every
    program resident at once, launched cooperatively where select.COOPERATIVE; select.one_launch_plan: True caps
    the programs at SMs // R, None takes it where the P R programs fit as they are). The interpreter runs one
    program after another, so there the digits are launches of their own and the emit takes the one launch's
    tickets (every program, _emit_tail_body ALL)."""
    R, L, oval, oidx = rows_and_outputs("tail_select", val, k, out)
    if val.dtype != torch.float32:
        raise ValueError(f"tail_select: val.dtype={val.dtype}; allowed: torch.float32 (bf16 rows: radix_select, "
                         "whose two digits are the whole key)")
    CAP = int(cap) if cap is not None else (16 if INTERPRET else 1024)
    if CAP < 1 or CAP & (CAP - 1):
        raise ValueError(f"tail_select: cap={cap}; allowed: a power of two")
    SMALL = int(small_cap) if small_cap is not None else min(64, CAP)
    if SMALL < 1 or SMALL & (SMALL - 1) or SMALL > CAP:
        raise ValueError(f"tail_select: small_cap={small_cap}; allowed: a power of two <= cap ({CAP})")
    if workspace is not None and not isinstance(workspace, SelectWorkspace):
        raise TypeError(f"tail_select: workspace is a {type(workspace).__name__}; allowed: SelectWorkspace, None")
    if R == 0:
        return oval, oidx
    if first_level not in (0, 1):
        raise ValueError(f"tail_select: first_level={first_level}; allowed: 0, 1")
    if first_level and (workspace is None or programs is None or block is None):
        raise ValueError("tail_select: first_level=1 needs the workspace, programs and block (the chunk) of the launch "
                         f"that counted digit 0; got workspace={type(workspace).__name__}, programs={programs}, "
                         f"block={block}")
    P = default_programs(R, L) if programs is None else max(1, int(programs))
    one_launch, P = one_launch_plan("tail_select", one_launch, R, P, first_level, val.device)
    BLOCK = int(block) if block is not None else (64 if INTERPRET else 2048)
    P, C = level_chunks("tail_select", L, P, BLOCK, first_level)
    ws = workspace if workspace is not None else SelectWorkspace(R, P, val.device)
    ws.fit_select(R, P, 2, 8, val.device)
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    KP = next_pow2(k)
    tv = torch.empty(R * k, dtype=torch.float32, device=val.device)         # TEMP: the picks above the bucket
    ti = torch.empty(R * k, dtype=torch.int32, device=val.device)
    bv = torch.empty(R * CAP, dtype=torch.float32, device=val.device)       # BUCK: the bucket's first CAP entries
    bi = torch.empty(R * CAP, dtype=torch.int32, device=val.device)
    tc = torch.empty(R * k, dtype=torch.int32, device=val.device)          # TC / BC: beside each TEMP / BUCK entry,
    bc = torch.empty(R * CAP, dtype=torch.int32, device=val.device)        # the other list's entries before it
    if one_launch and not INTERPRET:
        asm = asm_stores_on(asm_stores)
        _tail_one_launch[(P, R)](val, ws.hist, ws.scratch, tv, ti, bv, bi, tc, bc, oval, oidx, L, C, P, val.stride(0),
                                 oval.stride(0), Tq, q0, k, RATIO=ratio, BLOCK=BLOCK, QB=128, KP=KP, CAP=CAP,
                                 SMALL=SMALL, FIRST=first_level, ASM=asm, num_warps=num_warps,
                                 launch_cooperative_grid=cooperative_on(val.device),
                                 **({"maxnreg": ONE_LAUNCH_MAXNREG} if asm else {}))
        return oval, oidx
    on = pdl_on(PDL if pdl is None else pdl, val.device)
    modes = pdl_modes(3 - first_level, on)
    for lev in range(first_level, 2):
        _hist_level[(P, R)](val, ws.hist, ws.scratch, L, C, P, val.stride(0), Tq, q0, k, LEVEL=lev, NL=2, DB=8,
                            RATIO=ratio, BLOCK=BLOCK, PDL=modes[lev - first_level], num_warps=num_warps,
                            launch_pdl=on)
    _emit_tail[(P, R)](val, ws.hist, ws.scratch, tv, ti, bv, bi, tc, bc, oval, oidx, L, C, P, val.stride(0),
                       oval.stride(0), Tq, q0, k, RATIO=ratio, BLOCK=BLOCK, QB=128, KP=KP, CAP=CAP, SMALL=SMALL,
                       ALL=bool(one_launch), ASM=asm_stores_on(asm_stores), PDL=modes[-1], num_warps=num_warps,
                       launch_pdl=on)
    return oval, oidx


__all__ = ["tail_select"]
