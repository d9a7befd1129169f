"""Fine select: the tail select's exact top-k of fp32 (or bf16) rows in two launches, t's top 16 key bits from one
pass (docs/kernels.md §3).

    fine_select(val, k, frontier=None, out=None, programs=None) -> (vals (R, k) fp32, idx (R, k) int32)

tail_select (tailselect.py) fixes t16, the top 16 bits of the k-th largest key t, with two 8-bit digit launches, then
an emit launch whose last program settles t's low 16 bits. A decode row is latency-bound, so each launch costs about
as much as the next whatever its work. Here one launch counts both digits: the second as a fine histogram of the
top 16 key bits (65,536 bins per row), added to by integer atomics (the sum is exact in any order). P programs per
row, as tail_select's:

    count   program p builds its chunk's 256-bin histogram of digit 0 (added to the row's histogram 0) and the bin bl_p
            of its own min(k, chunk)-th largest key; every entry of its chunk whose digit 0 is >= bl_p adds one to the
            row's fine bin of its top 16 bits. The row's k-th largest key is >= every chunk's own, so its digit b0 is
            >= every bl_p: each entry with digit 0 = b0 is counted, and the fine slice of b0 (bins b0 * 256 ..
            b0 * 256 + 255) is digit 1's complete histogram. On N(0, 1) scores in 2048-entry chunks at k = 512 a
            chunk's own k-th key is its 75th percentile, ~0.67, whose digit-0 bin starts at 0.5: the entries >= 0.5
            add, P(X >= 0.5) ~ 0.31.
    emit    program p picks b0 from histogram 0 and b1 from the fine slice of b0 (t16 = b0 b1, krem = picks left in
            the bucket, nB = the bucket's size), zeroes its share of the fine table but b0's slice (read by every
            program), and walks its chunk in index order: entries above the bucket (key16 > t16) to its own TEMP list,
            the bucket's entries (key16 == t16) to its own BUCK list (its first CAP), both in index order, and stores
            how many of each. Then the row's ticket (a CTA barrier, then one acquire-release atomic add).
    tail    the row's last program to take a ticket reads every program's counts, so a list entry's place in the row
            (the programs' lists concatenated in program order are in index order) is its program's exclusive prefix
            plus its rank in the list: it gathers the n16 = k - krem entries above the bucket and the bucket's first
            CAP entries (binary search over the prefixes) and runs tail_select's tail on them (tailselect.py
            _tail_picks: t's low 16 bits, every pick at radix_select's slot); a bucket larger than CAP takes
            tail_select's streamed path (_tail_streamed). Then it zeroes b0's fine slice and the row's table.

Against tail_select: one launch boundary and one pass over the row fewer; the count launch adds about a third of its
entries to the fine table by atomics; the emit reads no earlier program's suffix counts, and the tail reads the P
programs' list lengths before it gathers the lists (one dependent read more on its path).
Output: radix_select's, slot for slot (select.py docstring). frontier as in select.py. Deterministic: every position
comes from counts, none from the order programs run. No host synchronisation (CUDA-graph safe). Workspace: a
FineWorkspace (its tables left zeroed by every call), R P (k + CAP) (value, index) list slots and 2 R P counts.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, dep_wait, next_pow2, pdl_modes, tl, triton
from .select import (SelectWorkspace, _chunk_at, _clear_row, _pick_bin, _row_base, _row_len, _take_chunk,
                     _ukey, asm_stores_on, default_programs, level_chunks, pdl_on)
from .tailselect import _count_below, _tail_picks, _tail_streamed, _walk_lists, tail_args

FINE = 1 << 16                 # fine bins per row: the top 16 key bits
# The default of fine_select's `pdl` (programmatic dependent launch, select.py docstring), as tail_select's
# (tailselect.PDL): the same picks bit for bit either way.
PDL = True


class FineWorkspace(SelectWorkspace):
    """A SelectWorkspace (histogram 0 and the ticket in `hist`; the per-program counts in `scratch`) and `fine`, per
    row FINE bins of the top 16 key bits, allocated zeroed once and left zeroed by every call."""

    def __init__(self, rows: int, programs: int | None = None, device="cuda"):
        super().__init__(rows, programs, device)
        self.fine = torch.zeros(self.rows * FINE, dtype=torch.int32, device=device)

    def fit_fine(self, rows: int, programs: int, device) -> None:
        """Room for `rows` rows over `programs` programs: histogram 0, the counts, the fine tables."""
        self.fit(rows, 2 * rows * programs, device)
        if self.fine.numel() < rows * FINE:
            self.outgrown.append(self.fine)
            self.fine = torch.zeros(rows * FINE, dtype=torch.int32, device=device)


@triton.jit
def _count_fine(VAL, HIST, FT, L, C, sv, Tq, q0, k, RATIO: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The first launch (grid (P, R)): digit 0's histogram and the fine bins of program p's chunk (module docstring).
    PDL: _common.pdl_modes, 0 or 1 (the chain's first launch: it waits before anything)."""
    tl.static_assert(PDL != 2, "the count launch is its chain's first")
    if PDL == 1:
        dep_wait()
    _count_fine_body(VAL, HIST, FT, L, C, sv, Tq, q0, k, tl.program_id(0), tl.program_id(1), RATIO, BLOCK)


@triton.jit
def _count_fine_body(VAL, HIST, FT, L, C, sv, Tq, q0, k, p, row, RATIO: tl.constexpr, BLOCK: tl.constexpr):
    """Program p of row `row` of the count launch; also run by each program of the decode score launch that counts
    the select's first digit (indexer_topk/triton.py level0) on the chunk it scored."""
    n = _row_len(row, L, Tq, q0, RATIO)
    c0 = p * C
    if (n > k) & (c0 < n):
        vrow = VAL + row.to(tl.int64) * sv
        c1 = tl.minimum(c0 + C, n)
        bins = tl.arange(0, 256)
        hist = tl.zeros([256], tl.int32)
        for st in range(c0, c1, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < c1
            u = _ukey(tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32))
            hist += tl.histogram((u >> 24) & 255, 256, mask=m)
        tl.atomic_add(HIST + _row_base(row, 1, 8) + bins, hist, mask=hist > 0)
        bl, _ = _pick_bin(hist, bins, tl.minimum(k, c1 - c0))       # the bin of the chunk's own k-th key
        frow = FT + row.to(tl.int64) * 65536
        for st in range(c0, c1, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < c1
            u = _ukey(tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32))
            keep = m & (((u >> 24) & 255) >= bl)                # at or above the chunk's k-th key's digit 0
            tl.atomic_add(frow + ((u >> 16) & 0xFFFF), tl.full([BLOCK], 1, tl.int32), mask=keep, sem="relaxed")


@triton.jit
def _gather_list(VL, IL, CNT, row, P, n_take, NS: tl.constexpr, RL, PP: tl.constexpr, LOGPP: tl.constexpr,
                 SLOT: tl.constexpr):
    """The first n_take entries, in index order, of the row's P per-program lists (list q at (row P + q) RL, its
    length at CNT[2 (row P + q) + SLOT]): (values (NS,), indices (NS,), mask); indices past n_take BIG."""
    BIG: tl.constexpr = 2147483647
    q = tl.arange(0, PP)
    cnt = tl.load(CNT + (row.to(tl.int64) * P + q) * 2 + SLOT, mask=q < P, other=0, volatile=True)
    inc = tl.cumsum(cnt, 0)                                    # entries of programs 0..q
    j = tl.arange(0, NS)
    m = j < n_take
    src = tl.minimum(_count_below(inc, j + 1, PP, LOGPP), PP - 1)      # the program holding entry j
    base = (row.to(tl.int64) * P + src) * RL + j - tl.gather(inc - cnt, src, 0)
    return (tl.load(VL + base, mask=m, other=0.0, volatile=True), tl.load(IL + base, mask=m, other=BIG, volatile=True),
            m)


@triton.jit
def _fine_tail(TV, TI, BV, BI, CNT, OVAL, OIDX, row, P, obase, nB, n16, krem, KP: tl.constexpr, LOGKP: tl.constexpr,
               CAP: tl.constexpr, S: tl.constexpr, LOGS: tl.constexpr, PP: tl.constexpr, LOGPP: tl.constexpr,
               ASM: tl.constexpr):
    """The row's last program, the bucket at most S (<= CAP) entries: both lists gathered in index order from the
    programs' own lists (_gather_list), then tail_select's tail (tailselect.py _tail_picks) in a tile of S."""
    cv, ci, mc = _gather_list(TV, TI, CNT, row, P, n16, KP, KP, PP, LOGPP, 0)
    bv, bi, mb = _gather_list(BV, BI, CNT, row, P, nB, S, CAP, PP, LOGPP, 1)
    _tail_picks(bv, bi, mb, cv, ci, mc, tl.arange(0, KP), OVAL, OIDX, obase, n16, krem, KP, LOGKP, S, LOGS, ASM)


@triton.jit
def _emit_fine(VAL, HIST, FT, CNT, TV, TI, BV, BI, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, RATIO: tl.constexpr,
               BLOCK: tl.constexpr, KP: tl.constexpr, LOGKP: tl.constexpr, CAP: tl.constexpr, LOGCAP: tl.constexpr,
               SMALL: tl.constexpr, LOGSMALL: tl.constexpr, PP: tl.constexpr, LOGPP: tl.constexpr,
               CLEAR: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """The second launch (grid (P, R)): program p's chunk to its lists, then the ticket; the last program's tail.
    PDL: _common.pdl_modes."""
    if PDL == 1:
        dep_wait()
    p = tl.program_id(0)
    row = tl.program_id(1)
    n, c0, vrow, obase = _chunk_at(VAL, L, C, sv, so, Tq, q0, p, row, RATIO)
    if n <= k:                                         # every visible entry is a pick: slot = column, rest -1
        if PDL == 2:
            dep_wait()
        _take_chunk(vrow, c0, C, n, k, OVAL, OIDX, obase, BLOCK)
    elif c0 < n:
        hbase = _row_base(row, 1, 8)
        c1 = tl.minimum(c0 + C, n)
        x = tl.load(vrow + c0 + tl.arange(0, BLOCK), mask=c0 + tl.arange(0, BLOCK) < c1, other=0.0)
        if PDL == 2:
            dep_wait()
        bins = tl.arange(0, 256)
        b0, krem = _pick_bin(tl.load(HIST + hbase + bins, volatile=True), bins, k)
        frow = FT + row.to(tl.int64) * 65536
        h1 = tl.load(frow + b0 * 256 + bins, volatile=True)     # digit 1's histogram: the fine slice of b0
        b1, krem = _pick_bin(h1, bins, krem)
        nB = tl.sum(tl.where(bins == b1, h1, 0), 0)                # the bucket's size
        t16 = b0 * 256 + b1
        # this program's share of the fine table back to zero, but b0's slice (the row's last program clears it)
        nP = (n + C - 1) // C
        share = (65536 + nP - 1) // nP
        for fs in range(p * share, tl.minimum(p * share + share, 65536), CLEAR):
            fo = fs + tl.arange(0, CLEAR)
            tl.store(frow + fo, tl.zeros([CLEAR], tl.int32),
                     mask=(fo < tl.minimum(p * share + share, 65536)) & ((fo >> 8) != b0))
        lrow = row.to(tl.int64) * P + p
        tb = lrow * KP
        bb = lrow * CAP
        ga = k * 0
        gb = k * 0
        ga, gb = _walk_lists(vrow, x, c0, c1, t16, ga, gb, TV, TI, BV, BI, tb, bb, CAP, BLOCK, ASM)
        tl.store(CNT + lrow * 2, ga)
        tl.store(CNT + lrow * 2 + 1, tl.minimum(gb, CAP))
        # ticket: this program's stores and table reads before it (barrier, then release); the row's last program
        # (acquire) reads every other one's stores
        tl.debug_barrier()
        if tl.atomic_add(HIST + hbase + 256, 1, sem="acq_rel", scope="gpu") == nP - 1:
            if nB <= SMALL:                                                # the usual bucket: a small tile
                _fine_tail(TV, TI, BV, BI, CNT, OVAL, OIDX, row, P, obase, nB, k - krem, krem, KP, LOGKP, CAP, SMALL,
                           LOGSMALL, PP, LOGPP, ASM)
            elif nB <= CAP:
                _fine_tail(TV, TI, BV, BI, CNT, OVAL, OIDX, row, P, obase, nB, k - krem, krem, KP, LOGKP, CAP, CAP,
                           LOGCAP, PP, LOGPP, ASM)
            else:
                _tail_streamed(vrow, n, t16 << 16, krem, k, OVAL, OIDX, obase, BLOCK, ASM)
            tl.store(frow + b0 * 256 + bins, tl.zeros([256], tl.int32))
            _clear_row(HIST, hbase, 1, 8)
    elif PDL == 2:
        dep_wait()


def fine_select(val: torch.Tensor, k: int, frontier: tuple[int, int, int] | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None, programs: int | None = None,
                workspace: FineWorkspace | None = None, block: int | None = None, cap: int | None = None,
                small_cap: int | None = None, num_warps: int = 8, asm_stores: bool | None = None,
                first_level: int = 0, pdl: bool | None = None):
    """Top-k of every row of val (R, L) fp32 or bf16 (last dim contiguous; bf16 values widened exactly, their keys'
    low 16 bits all alike: the bucket is the entries equal to t), 1 <= k <= L, radix_select's output slot for slot,
    in two launches (module docstring). programs: per row (default select.default_programs); workspace: a
    FineWorkspace (one is allocated when None); block: entries per loop step (default 2048, 64 in the interpreter;
    chunks are whole blocks); cap (CAP): bucket entries the tail gathers into registers, a power of two (default
    1024, 16 in the interpreter); small_cap (SMALL): the smaller tile taken when the bucket fits it, a power of two
    <= cap (default min(64, cap)); out: (vals, idx) views to write into; asm_stores: select.asm_stores_on.
    first_level=1: the count launch's work already done into the workspace by the launch that wrote the rows
    (indexer_scores_triton level0 under triton.FUSED_FINE), over `programs` chunks of `block` entries: the emit alone.
    pdl: the launches start early, programmatic dependent launch (select.pdl_on; None: this module's PDL)."""
    R, L, oval, oidx, CAP, SMALL, BLOCK = tail_args("fine_select", val, k, out, workspace, FineWorkspace, cap,
                                                    small_cap, first_level, programs, block, bf16=True)
    if R == 0:
        return oval, oidx
    P, C = level_chunks("fine_select", L, default_programs(R, L) if programs is None else max(1, int(programs)),
                        BLOCK, first_level)
    ws = workspace if workspace is not None else FineWorkspace(R, P, val.device)
    ws.fit_fine(R, P, val.device)
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    KP = next_pow2(k)
    PP = next_pow2(P)
    tv = torch.empty(R * P * KP, dtype=torch.float32, device=val.device)   # TEMP: each program's entries above
    ti = torch.empty(R * P * KP, dtype=torch.int32, device=val.device)     # the bucket
    bv = torch.empty(R * P * CAP, dtype=torch.float32, device=val.device)  # BUCK: each program's first CAP bucket
    bi = torch.empty(R * P * CAP, dtype=torch.int32, device=val.device)    # entries
    on = pdl_on(PDL if pdl is None else pdl, val.device)
    modes = pdl_modes(2 - first_level, on)
    if not first_level:
        _count_fine[(P, R)](val, ws.hist, ws.fine, L, C, val.stride(0), Tq, q0, k, RATIO=ratio, BLOCK=BLOCK,
                            PDL=modes[0], num_warps=num_warps, launch_pdl=on)
    _emit_fine[(P, R)](val, ws.hist, ws.fine, ws.scratch, tv, ti, bv, bi, oval, oidx, L, C, P, val.stride(0),
                       oval.stride(0), Tq, q0, k, RATIO=ratio, BLOCK=BLOCK, KP=KP, LOGKP=KP.bit_length() - 1, CAP=CAP,
                       LOGCAP=CAP.bit_length() - 1, SMALL=SMALL, LOGSMALL=SMALL.bit_length() - 1, PP=PP,
                       LOGPP=PP.bit_length() - 1, CLEAR=64 if INTERPRET else 1024, ASM=asm_stores_on(asm_stores),
                       PDL=modes[-1], num_warps=num_warps, launch_pdl=on)
    return oval, oidx


__all__ = ["fine_select", "FineWorkspace"]
