"""Split-row radix select: exact top-k of fp32 or bf16 rows, each row spread over many programs (docs/kernels.md §3).

    radix_select(val, k, frontier=None, programs=None) -> (vals (R, k) fp32, idx (R, k) int32)

Keys: u = the order-preserving unsigned image of the fp32 value (bf16 values are widened to fp32 exactly, so only
their top 16 bits differ; -0.0 has the key of +0.0). The threshold key t (the k-th largest) is found DB bits at a
time (a digit), one launch per digit, NL = 32 / DB digits for fp32 rows, 16 / DB for bf16 rows (their low 16 bits
are all equal). A row of L entries is cut into P chunks of C entries (whole blocks), one program per chunk:

    launch l    every program of the row reads the record of digits b_0..b_{l-2} of t (prefix and picks left,
                stored by program 0 of launch l - 1) and the complete histogram l - 1, and picks digit b_{l-1} (the
                same arithmetic in every program, so no program waits for another; program 0 stores the record
                through b_{l-1}); one read of L2 for all of it, with the chunk's first block loading beside it.
                Then it builds its chunk's 2^DB-bin histogram of digit l over the entries whose top DB*l bits are
                b_0..b_{l-1}: added to the row's histogram l (integer atomics: the sum is exact in any order), and,
                programs 0..P-2, stored as suffix counts S_{p,l}[b] = entries of the chunk in bins >= b (its own
                slots, no atomics)
    emit        every program picks the last digit the same way, so it has t (digits b_0..b_{NL-1}) and r = how
                many picks have key == t; the programs before it, q < p, hold  gt_q = sum_l S_{q,l}[b_l + 1]
                entries > t  and  eq_q = S_{q,NL-1}[b_{NL-1}] - S_{q,NL-1}[b_{NL-1} + 1]  entries == t (an entry
                > t first exceeds t at exactly one digit; the NL + 1 counts of every earlier program are read at
                once), so its own picks start at slot sum_{q<p} gt_q and tie rank sum_{q<p} eq_q; it walks its
                chunk block by block in index order (positions by tl.cumsum over the block's masks). Once it has
                read the row's histograms and record it takes a ticket (one atomic add on the row's counter); the
                row's last program to take one zeroes the row's table (_clear_row), so no launch has to zero it
                before the next call (the workspace leaves every call as it entered it: SelectWorkspace)

    one launch  (one_launch=True; ONE_LAUNCH for the default) the same levels and emit in one launch, a grid barrier
                per row in place of each launch boundary (_select_one_launch): for few rows, where every launch
                costs latency, with every program resident at once (P R <= the SMs; launched cooperatively,
                COOPERATIVE, so that the driver guarantees it or fails the launch)
    digit 0     (first_level=1) already counted, with its suffix counts, by the launch that wrote the rows
                (indexer_topk/triton.py indexer_scores_triton level0: each score program runs launch 0's program,
                _hist_body, on the chunk it scored): the launches start at digit 1
    PDL         (pdl=True; PDL for the default; sm_90+) each launch starts before the one before it ends
                (programmatic dependent launch): its programs wait (griddepcontrol.wait) for that launch's writes
                before they read the row's tables or write anything, and then let the next launch start; the digit
                launches after the first and the emit load their chunk's first block before they wait (no launch of
                a select writes the rows). Every program waits, also one with nothing to do, so no launch ends
                before the one before it and the waits chain: a launch's start implies that every launch before
                its predecessor has ended

Output (deterministic, the naive twin's tie rule: indexer_topk/naive.py, docs/kernels.md §3): slots [0, k - r) hold
the entries with key > t in increasing index order, slots [k - r, k) the r LOWEST-INDEX entries with key == t in
increasing index order; so the set of picks is the naive twin's (stable sort, lower index first) on the same row,
and the slot order depends only on the row, not on the order programs run. Picks of value -inf report index -1.
Rows with n <= k visible entries take all of them in index order (slot = column; slots >= n: -1 / -inf).
frontier=(Tq, q0, ratio): row r = b Tq + i only has n_r = min(L, (q0 + i + 1) // ratio) visible entries (the columns
after them are never read: the score kernel may leave them unwritten); None: every row has L.

No host synchronisation: the launches have fixed grids and every data-dependent choice is made on the device, so the
sequence can be captured in a CUDA graph.

Digit width: tl.histogram costs about (bins / 32 + 1) x DB warp instructions per 32 entries (warp ballots), so
8-bit digits (256 bins) cost ~7x the ALU of 4-bit ones per pass. Decode (few rows, latency-bound: every launch
counts) takes DB = 8 (NL = 4 digit launches for fp32 rows, 2 for bf16); prefill (many rows, ALU-bound) DB = 4 (4
launches for bf16 rows, each a bandwidth-bound read). Each launch reads its chunk of the row once (L2-resident at
decode: a 256K-entry row is 1 MB of fp32). The emit's extra reads are (NL + 1) suffix counts per earlier program.

Workspace (SelectWorkspace, int32): per row NL 2^DB histogram bins, the ticket counter and NL digit records (prefix,
picks left), all zero between calls (allocated zeroed once; the ticket's last program clears all of it); and
R x (P - 1) x NL 2^DB per-program suffix counts (none at P = 1; written before read).
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, dep_wait, jit, pdl_modes, sm_count, tl, triton, use_pdl

SMS = 132                                     # streaming multiprocessors assumed by default_programs (H200)
HMAX = max(8 * 16, 4 * 256)                   # NL x 2^DB, the largest digit table (fp32 rows: DB 4 -> 128, 8 -> 1024)
ROW_WORDS = HMAX + 1 + 2 * 8                  # a row's table (_row_base): the bins, the ticket, <= 8 digits' records
# radix_select's and tail_select's default (one_launch=None; one_launch_plan): one launch where a call's programs
# all fit the SMs at once as they are (P R <= SMs: decode's rows). Measured on an H100, each form's 7 captures in
# turn (benchmarks/probe_one_launch.py): never slower, up to 1 us faster (benchmarks/README.md T5).
ONE_LAUNCH = True
# The one-launch selects launched cooperatively (CUDA's cooperative launch, Triton's launch_cooperative_grid): the
# driver starts the grid only with every program resident at once, and fails the launch where they cannot all be
# (an MPS SM limit, too many programs for the SMs) instead of letting the grid barriers spin forever.
COOPERATIVE = True
# The default store form of the selects' compacted picks and candidates (_scatter; `asm_stores` of radix_select,
# sieve_select, row_select): inline PTX stores on the GPU when True. Compiled for sm_90 they leave 0-2 of the sieve
# kernel's 14-16 layout conversions (benchmarks/kernel_registers.py `layout_converts`), the cost the sieve's stage
# probe puts most of its time in; on the H200 the same picks, bit for bit, and faster (docs/kernels.md §3).
ASM_STORES = True
# The default of radix_select's `pdl`: its launches after the first start early (programmatic dependent launch,
# module docstring). Off: on a 256K bf16 row (two digit launches and the emit) it measured no faster per replay and
# slower per call inside a graph; fp32 rows gain, but the library sends them to the tail select, whose default is
# tailselect.PDL (benchmarks/README.md T5).
PDL = False


def asm_stores_on(asm_stores: bool | None) -> bool:
    """The ASM constexpr of a select launch: asm_stores (None: ASM_STORES), never under the interpreter (it cannot
    run PTX) nor while torch.compile traces the call (its analysis of a Triton kernel's writes cannot read inline
    PTX: "ttir analysis hit an op we do not know how to analyze: tt.elementwise_inline_asm"); the same picks."""
    return (ASM_STORES if asm_stores is None else bool(asm_stores)) and not INTERPRET \
        and not torch.compiler.is_compiling()


def cooperative_on(device: torch.device) -> bool:
    """Whether a one-launch select is launched cooperatively: COOPERATIVE on a CUDA device, never under the
    interpreter (which runs the one-launch selects as separate launches)."""
    return COOPERATIVE and not INTERPRET and device.type == "cuda"


def one_launch_plan(name: str, one_launch: bool | None, R: int, P: int, first_level: int,
                    device: torch.device) -> tuple[bool, int]:
    """(one launch or not, programs per row) of a split-row select of R rows over P programs each. one_launch=True:
    one launch with P capped at SMs // R (R > SMs: a one-line ValueError naming `name`; with first_level=1 the
    chunks are fixed, so launches apart where P R > SMs; the interpreter runs the SMs of select.SMS); None:
    ONE_LAUNCH where the P R programs fit the SMs as they are, on a CUDA device, not while torch.compile traces
    (its wrapper of Triton launches is not given the cooperative attribute); False: launches apart."""
    if one_launch is None:
        return (ONE_LAUNCH and device.type == "cuda" and not INTERPRET and not torch.compiler.is_compiling()
                and P * R <= sm_count(device)), P
    if not one_launch:
        return False, P
    sms = sm_count(device) if device.type == "cuda" else SMS
    if R > sms:
        raise ValueError(f"{name}: one_launch=True with R={R} rows; allowed: R <= {sms} (the SMs: every program of "
                         "the launch must be resident at once)")
    if first_level and P * R > sms:                           # level-0 chunks fixed: no fewer programs
        return False, P
    return True, min(P, sms // max(R, 1))


def pdl_on(pdl: bool | None, device: torch.device) -> bool:
    """Whether a select's launches use programmatic dependent launch: pdl (None: PDL, radix_select's default; the tail
    select passes its own) where the device supports it (_common.use_pdl).
    Their PDL constexprs: _common.pdl_modes (the first launch waits before anything, the launch before it may be
    the one that wrote the rows; the others load their chunk's first block, then wait)."""
    return use_pdl(pdl, PDL, device)


@jit
def _ukey(v):
    """Order-preserving int32 image of fp32 v with the sign bit flipped: compared on 8-bit digits it orders as an
    unsigned integer (digit d = (u >> s) & 255)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)                              # -0.0 ties with +0.0 (as in torch)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) ^ -2147483648


@jit
def _row_len(row, L, Tq, q0, RATIO: tl.constexpr):
    if RATIO > 0:
        return tl.minimum((q0 + row % Tq + 1) // RATIO, L)
    return L


@jit
def _take_all(vrow, offs, n, k, OVAL, OIDX, obase):
    """A row with n <= k visible entries, the slots `offs`: every visible entry is its own pick (slot = column), -1 /
    -inf in the slots past them (and for -inf entries)."""
    m = offs < k
    v = tl.load(vrow + offs, mask=m & (offs < n), other=float("-inf")).to(tl.float32)
    ok = (offs < n) & (v != float("-inf"))
    tl.store(OVAL + obase + offs, tl.where(ok, v, float("-inf")), mask=m)
    tl.store(OIDX + obase + offs, tl.where(ok, offs, -1), mask=m)


@jit
def _chunk_at(VAL, L, C, sv, so, Tq, q0, p, row, RATIO: tl.constexpr):
    """Program p of row `row` of a split row: (its visible entries n, its chunk's start, the row's values, the row's
    output offset)."""
    return _row_len(row, L, Tq, q0, RATIO), p * C, VAL + row.to(tl.int64) * sv, row.to(tl.int64) * so


@jit
def _take_chunk(vrow, c0, C, n, k, OVAL, OIDX, obase, BLOCK: tl.constexpr):
    """_take_all over the slots of a chunk [c0, c0 + C) that lie below k (a split row's program, n <= k)."""
    for st in range(c0, tl.minimum(c0 + C, k), BLOCK):
        _take_all(vrow, st + tl.arange(0, BLOCK), n, k, OVAL, OIDX, obase)


@jit
def _scatter(ptr, v, m, ASM: tl.constexpr):
    """tl.store(ptr, v, mask=m) of 32-bit v at data-dependent addresses (the compacted picks and candidates). ASM:
    as one predicated PTX store per element, in the layout v already has. Triton gives a store whose addresses it
    cannot prove contiguous a one-element-per-thread layout of its own, so a tl.store here converts v, the mask and
    the positions through shared memory and runs the position cumsum a second time in that layout, on every block
    (docs/kernels.md §3); the inline store needs neither. Its result (0) is only there for the elementwise form."""
    if ASM:
        tl.inline_asm_elementwise("@$3 st.global.b32 [$1], $2; mov.u32 $0, 0;", "=r,l,r,b",
                                  [ptr, v.to(tl.int32, bitcast=True), m], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptr, v, mask=m)


@jit
def _store_picks(v, idx, is_gt, is_eq, gt, eq, n_gt, k, OVAL, OIDX, obase, ASM: tl.constexpr):
    """The output of one block of a row in slot order (module docstring): entries > t (is_gt) at slots gt, gt + 1, ..
    in index order, entries == t (is_eq) of tie rank eq, eq + 1, .. at slot n_gt + rank while the rank is below
    k - n_gt; -inf entries report index -1. gt / eq: picks > t and entries == t of the blocks before. Returns the new
    (gt, eq)."""
    idx = tl.where(v == float("-inf"), -1, idx)
    pos = gt + tl.cumsum(is_gt.to(tl.int32), 0) - 1                           # slots in index order
    _scatter(OVAL + obase + pos, v, is_gt, ASM)
    _scatter(OIDX + obase + pos, idx, is_gt, ASM)
    rank = eq + tl.cumsum(is_eq.to(tl.int32), 0) - 1                          # tie rank in the row, by index
    take = is_eq & (rank < k - n_gt)                                          # the lowest-index ties
    _scatter(OVAL + obase + n_gt + rank, v, take, ASM)
    _scatter(OIDX + obase + n_gt + rank, idx, take, ASM)
    return gt + tl.sum(is_gt.to(tl.int32), 0), eq + tl.sum(is_eq.to(tl.int32), 0)


@jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@jit
def _pick_bin(h, bins, krem):
    """One radix step: of the histogram h over `bins` (highest bin = largest keys), the bin b that holds the krem-th
    largest entry, and how many of the picks still lie in it: (b, krem - entries in bins above b). 1 <= krem <=
    sum(h). b is the one bin where the suffix count crosses krem (entries in bins >= b reach it, in bins > b do not),
    found with its krem in one two-operand reduction (one scan and one sum: two CTA-wide steps)."""
    cge = tl.cumsum(h, 0, reverse=True)                                        # entries in bins >= b
    above = cge - h                                                            # entries in bins > b
    at_b = (cge >= krem) & (above < krem)
    return tl.reduce((tl.where(at_b, bins, 0), tl.where(at_b, krem - above, 0)), 0, _add_pair)


@jit
def _row_base(row, NL: tl.constexpr, DB: tl.constexpr):
    """Start of a row's table in the workspace's `hist`: NL 2^DB histogram bins, the ticket counter, then NL records
    (prefix, krem) of the digits picked so far (the layout SelectWorkspace allocates)."""
    H: tl.constexpr = NL * (1 << DB)
    return row.to(tl.int64) * (H + 1 + 2 * NL)


@jit
def _clear_row(HIST, hbase, NL: tl.constexpr, DB: tl.constexpr):
    """Zero a row's whole table (bins, ticket, records): every call leaves the workspace as it found it, so calls of
    other digit widths, whose rows lie at other offsets, find zeros wherever their bins fall."""
    H: tl.constexpr = NL * (1 << DB)
    tl.store(HIST + hbase + tl.arange(0, H), tl.zeros([H], tl.int32))
    tail = tl.arange(0, 32)                                                    # the ticket and 2 NL <= 16 words
    tl.store(HIST + hbase + H + tail, tl.zeros([32], tl.int32), mask=tail < 1 + 2 * NL)


@jit
def _prefix(HIST, hbase, k, LEVEL, p, NL: tl.constexpr, DB: tl.constexpr):
    """Digits 0..LEVEL-1 of the k-th largest key: (prefix with those digits set at their places, how many of the k
    picks still lie in the bin the prefix names). Digits 0..LEVEL-2 come as the record program 0 of the launch
    before stored, digit LEVEL-1 from its complete histogram, both read at once: one pick per launch, not LEVEL of
    them in a chain of loads. Program 0 (p == 0) stores the record of digits 0..LEVEL-1 for the next launch."""
    NB: tl.constexpr = 1 << DB
    H: tl.constexpr = NL * NB
    bins = tl.arange(0, NB)
    rec = HIST + hbase + H + 1 + 2 * (LEVEL - 2)                           # digits 0..LEVEL-2, if LEVEL >= 2
    pref = tl.load(rec, mask=LEVEL >= 2, other=0, volatile=True)
    krem = tl.load(rec + 1, mask=LEVEL >= 2, other=k, volatile=True)
    if LEVEL >= 1:
        h = tl.load(HIST + hbase + (LEVEL - 1) * NB + bins, volatile=True)
        b, krem = _pick_bin(h, bins, krem)
        pref = pref | (b << (32 - DB * LEVEL))
        if p == 0:
            tl.store(rec + 2, pref)
            tl.store(rec + 3, krem)
    return pref, krem


@jit
def _hist_level(VAL, HIST, PH, L, C, P, sv, Tq, q0, k, LEVEL, NL: tl.constexpr, DB: tl.constexpr,
                RATIO: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Launch LEVEL + 1 (grid (P, R)): digit LEVEL of the row's histogram; programs 0..P-2 also keep their own.
    PDL: pdl_modes."""
    _hist_body(VAL, HIST, PH, L, C, P, sv, Tq, q0, k, LEVEL, tl.program_id(0), tl.program_id(1), NL, DB, RATIO, BLOCK,
               PDL)


@jit
def _hist_body(VAL, HIST, PH, L, C, P, sv, Tq, q0, k, LEVEL, p, row, NL: tl.constexpr, DB: tl.constexpr,
               RATIO: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program p of row `row`, digit LEVEL (the levels before it complete in HIST). PDL: pdl_modes (0 where the
    caller is not a launch of its own)."""
    if PDL == 1:
        dep_wait()
    n = _row_len(row, L, Tq, q0, RATIO)
    c0 = p * C
    if (n > k) & (c0 < n):
        NB: tl.constexpr = 1 << DB
        H: tl.constexpr = NL * NB
        hbase = _row_base(row, NL, DB)                          # H bins, the ticket counter, the digits' records
        vrow = VAL + row.to(tl.int64) * sv
        c1 = tl.minimum(c0 + C, n)
        x = tl.load(vrow + c0 + tl.arange(0, BLOCK), mask=c0 + tl.arange(0, BLOCK) < c1, other=0.0)
        if PDL == 2:
            dep_wait()
        pref, krem = _prefix(HIST, hbase, k, LEVEL, p, NL, DB)          # (its loads in flight with the block's)
        SH = 32 - DB * (LEVEL + 1)                                             # runtime: one compile for all levels
        HS = tl.minimum(SH + DB, 31)                        # no 32-bit shift at level 0 (undefined; masked out below)
        hist = tl.zeros([NB], tl.int32)
        for st in range(c0, c1, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < c1
            u = _ukey(x.to(tl.float32))
            m = m & ((LEVEL == 0) | ((u >> HS) == (pref >> HS)))                 # inside the bin chosen so far
            hist += tl.histogram((u >> SH) & (NB - 1), NB, mask=m)
            x = tl.load(vrow + offs + BLOCK, mask=offs + BLOCK < c1, other=0.0)    # the next block (one live)
        bins = tl.arange(0, NB)
        tl.atomic_add(HIST + hbase + LEVEL * NB + bins, hist, mask=hist > 0)
        if p < P - 1:                                  # suffix counts S_{p,LEVEL}[b] for the emit of later programs
            pbase = (row.to(tl.int64) * (P - 1) + p) * H
            tl.store(PH + pbase + LEVEL * NB + bins, tl.cumsum(hist, 0, reverse=True))
    elif PDL == 2:
        dep_wait()


@jit
def _emit(VAL, HIST, PH, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, NL: tl.constexpr, DB: tl.constexpr,
          RATIO: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Last launch (grid (P, R)): program p writes its chunk's picks at the slots the programs before it leave.
    PDL: pdl_modes."""
    _emit_body(VAL, HIST, PH, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, tl.program_id(0), tl.program_id(1), NL, DB,
               RATIO, BLOCK, QB, True, ASM, PDL)


@jit
def _emit_body(VAL, HIST, PH, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, p, row, NL: tl.constexpr, DB: tl.constexpr,
               RATIO: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr, TICKET: tl.constexpr, ASM: tl.constexpr,
               PDL: tl.constexpr):
    """Program p of row `row` after every digit; TICKET: take the ticket that clears the row's histograms (the
    one-launch select clears them itself). PDL: pdl_modes (0 where the caller is not a launch of its own)."""
    if PDL == 1:
        dep_wait()
    n, c0, vrow, obase = _chunk_at(VAL, L, C, sv, so, Tq, q0, p, row, RATIO)
    if n <= k:                                         # every visible entry is a pick: slot = column, rest -1
        if PDL == 2:
            dep_wait()
        _take_chunk(vrow, c0, C, n, k, OVAL, OIDX, obase, BLOCK)
    elif c0 < n:                                       # (then every program q < p has c0_q < n too: all stored)
        NB: tl.constexpr = 1 << DB
        H: tl.constexpr = NL * NB
        hbase = _row_base(row, NL, DB)
        c1 = tl.minimum(c0 + C, n)
        x = tl.load(vrow + c0 + tl.arange(0, BLOCK), mask=c0 + tl.arange(0, BLOCK) < c1, other=0.0)
        if PDL == 2:
            dep_wait()
        pref, krem = _prefix(HIST, hbase, k, NL, 1, NL, DB)  # (its loads in flight with the block's; p 1: no record)
        # ticket (acq_rel: this program's histogram reads come before it); the last of the row's cdiv(n, C)
        # programs sees every other one's reads done and zeroes the row's table for the next call
        if TICKET:
            if tl.atomic_add(HIST + hbase + H, 1) == (n + C - 1) // C - 1:
                _clear_row(HIST, hbase, NL, DB)
        n_gt = k - krem                                                       # picks > t: slots [0, n_gt)
        # gt / eq: entries > t / == t in the chunks of programs 0..p-1, from their suffix counts (QB programs at a
        # time, all NL + 1 counts of a program in one load): an entry > t first exceeds t at exactly one digit l,
        # so gt_q = sum_l S_{q,l}[b_l + 1]; eq_q = S_{q,NL-1}[b_{NL-1}] - S_{q,NL-1}[b_{NL-1} + 1]
        lv = tl.arange(0, NL)
        dig = (pref >> (32 - DB * (lv + 1))) & (NB - 1)                       # (NL,) the digits b_l of t
        blast = (pref >> (32 - DB * NL)) & (NB - 1)                           # b_{NL-1}
        gt = k * 0
        eq = k * 0
        for qs in range(0, p, QB):
            q = qs + tl.arange(0, QB)
            mq = q < p
            qrow = PH + (row.to(tl.int64) * (P - 1) + q) * H                  # (QB,) pointers to S_{q, 0}[0]
            s_up = tl.load(qrow[:, None] + lv[None, :] * NB + dig[None, :] + 1, volatile=True, other=0,
                           mask=mq[:, None] & (dig[None, :] + 1 < NB))        # (QB, NL) S_{q,l}[b_l + 1]
            s_at = tl.load(qrow + (NL - 1) * NB + blast, mask=mq, other=0, volatile=True)      # (QB,)
            gt += tl.sum(tl.sum(s_up, 1), 0)
            eq += tl.sum(s_at - tl.sum(tl.where(lv[None, :] == NL - 1, s_up, 0), 1), 0)
        SH: tl.constexpr = 32 - DB * NL
        tpre = pref >> SH                                                     # threshold prefix (DB NL bits)
        for st in range(c0, c1, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < c1
            v = x.to(tl.float32)
            u = _ukey(v) >> SH
            if SH == 0:                        # full 32-bit keys: compare as signed (flip the sign bit back)
                a = u ^ -2147483648
                t = tpre ^ -2147483648
            else:                              # < 32 bits after the shift: mask to the unsigned prefix
                a = u & ((1 << (32 - SH)) - 1)
                t = tpre & ((1 << (32 - SH)) - 1)
            gt, eq = _store_picks(v, offs, m & (a > t), m & (a == t), gt, eq, n_gt, k, OVAL, OIDX, obase, ASM)
            x = tl.load(vrow + offs + BLOCK, mask=offs + BLOCK < c1, other=0.0)    # the next block (one live)
    elif PDL == 2:
        dep_wait()


@jit
def _arrive_and_wait(CNT, target):
    """Grid barrier of a row's programs (all resident at once): count this program in, then wait until `target`
    arrivals. The CTA barrier before it orders every thread's histogram atomics and suffix-count stores before the
    (release) arrival; the (acquire) polls order the reads after it."""
    tl.debug_barrier()
    tl.atomic_add(CNT, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@jit
def _select_one_launch(VAL, HIST, PH, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, NL: tl.constexpr, DB: tl.constexpr,
                       RATIO: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr, FIRST: tl.constexpr,
                       ASM: tl.constexpr):
    """The whole select in one launch (grid (P, R), every program resident: P R <= SMs): the digit levels FIRST..
    NL-1 (the ones before already counted) and the emit of the multi-launch select, a grid barrier per row after
    each level in place of the launch boundary. The row's counter (its histogram table's ticket slot) counts every
    program's arrival at every barrier and its exit; the last to exit zeroes the table and the counter for the next
    call."""
    p = tl.program_id(0)
    row = tl.program_id(1)
    H: tl.constexpr = NL * (1 << DB)
    hbase = _row_base(row, NL, DB)
    cnt = HIST + hbase + H
    for lev in range(FIRST, NL):
        _hist_body(VAL, HIST, PH, L, C, P, sv, Tq, q0, k, lev, p, row, NL, DB, RATIO, BLOCK, 0)
        _arrive_and_wait(cnt, (lev - FIRST + 1) * P)
    _emit_body(VAL, HIST, PH, OVAL, OIDX, L, C, P, sv, so, Tq, q0, k, p, row, NL, DB, RATIO, BLOCK, QB, False, ASM, 0)
    tl.debug_barrier()
    if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == (NL - FIRST + 1) * P - 1:   # every program read its last
        _clear_row(HIST, hbase, NL, DB)


def rows_and_outputs(name: str, val: torch.Tensor, k: int, out=None):
    """The checks every select makes of its rows val (R, L) and k, and its outputs: (R, L, vals, idx), the (R, k)
    fp32 / int32 outputs allocated, or `out` checked (two views with the same strides, last dim contiguous)."""
    check_device(val)
    R, L = val.shape
    if val.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{name}: val.dtype={val.dtype}; allowed: torch.float32, torch.bfloat16")
    if not 0 < k <= L:
        raise ValueError(f"{name}: k={k}; allowed: 1 <= k <= L = {L}")
    assert val.stride(-1) == 1, f"{name}: the last dim of val must be contiguous"
    if out is None:
        return (R, L, torch.empty(R, k, dtype=torch.float32, device=val.device),
                torch.empty(R, k, dtype=torch.int32, device=val.device))
    oval, oidx = out
    assert oval.shape == oidx.shape == (R, k) and oval.stride() == oidx.stride() and oval.stride(-1) == 1, \
        f"{name}: out must be two (R, k) views with the same strides, last dim contiguous"
    return R, L, oval, oidx


def digit_levels(dtype: torch.dtype, digit_bits: int) -> int:
    """Digits of digit_bits bits in a row's keys: bf16 values differ in their top 16 bits only, fp32 in all 32."""
    return (16 if dtype == torch.bfloat16 else 32) // digit_bits


def default_programs(R: int, L: int, sms: int = SMS) -> int:
    """Programs per row: enough to fill the GPU when there are few rows (decode), one per row when there are many
    (prefill), never chunks under 2048 entries."""
    return max(1, min(triton.cdiv(L, 2048), triton.cdiv(4 * sms, max(R, 1))))


def chunks(L: int, programs: int, block: int) -> tuple[int, int]:
    """A row of L entries over at most `programs` programs in chunks of whole blocks: (programs P, chunk C), P =
    cdiv(L, C) (the cut of the split-row selects: radix_select, tail_select)."""
    C = triton.cdiv(triton.cdiv(L, programs), block) * block
    return triton.cdiv(L, C), C


def level_chunks(name: str, L: int, programs: int, block: int, first_level: int) -> tuple[int, int]:
    """chunks(L, programs, block); with first_level=1 they must be the chunks the level-0 launch counted (programs =
    cdiv(L, block), block entries each), else a one-line ValueError naming `name`."""
    P, C = chunks(L, programs, block)
    if first_level and (C != block or P != programs):
        raise ValueError(f"{name}: first_level=1 with programs={programs}, block={block} on rows of L={L}: the chunks "
                         f"would be {C} entries over {P} programs; allowed: programs = cdiv(L, block), as the level-0 "
                         "launch cut them")
    return P, C


class SelectWorkspace:
    """radix_select's buffers for up to `rows` rows (docstring above): `hist`, per row the histogram bins, the ticket
    counter and the digits' records, allocated zeroed once and left zeroed by every call (its last program per row
    clears them), so a call needs no zeroing launch; `scratch`, the per-program suffix counts of programs 0..P-2 of
    every row, written before they are read. With programs=None the scratch fits the default programs of any row
    length (default_programs: R (P - 1) <= 4 SMS - 1); with programs= given, R (programs - 1) suffix tables.
    One workspace serves calls of any shape, dtype and digit width up to `rows` rows, but not two calls running at
    once (two streams): their tickets and histograms would mix. A call that needs more grows it (`fit`); the
    buffers it outgrew stay referenced, since a CUDA graph captured with them writes there on every replay."""

    def __init__(self, rows: int, programs: int | None = None, device="cuda"):
        self.rows = int(rows)
        extra = 4 * SMS - 1 if programs is None else self.rows * (max(1, int(programs)) - 1)
        self.hist = torch.zeros(self.rows * ROW_WORDS, dtype=torch.int32, device=device)
        self.scratch = torch.empty(max(1, extra * HMAX), dtype=torch.int32, device=device)
        self.outgrown: list[torch.Tensor] = []

    def fit_select(self, rows: int, programs: int, levels: int, digit_bits: int, device) -> None:
        """Room for a select of `rows` rows over `programs` programs each, `levels` digits of `digit_bits` bits (the
        histogram tables and the suffix counts of programs 0..programs-2)."""
        self.fit(rows, rows * (programs - 1) * levels * (1 << digit_bits), device)

    def fit(self, rows: int, scratch: int, device) -> None:
        """Room for `rows` rows of histograms (a new zeroed table) and `scratch` suffix-count elements."""
        if self.rows < rows:
            self.outgrown.append(self.hist)
            self.rows, self.hist = rows, torch.zeros(rows * ROW_WORDS, dtype=torch.int32, device=device)
        if self.scratch.numel() < scratch:
            self.outgrown.append(self.scratch)
            self.scratch = torch.empty(scratch, dtype=torch.int32, device=device)


def radix_select(val: torch.Tensor, k: int, frontier: tuple[int, int, int] | None = None,
                 programs: int | None = None, workspace: SelectWorkspace | None = None, digit_bits: int | None = None,
                 block: int | None = None, num_warps: int = 8, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 one_launch: bool | None = None, asm_stores: bool | None = None, first_level: int = 0,
                 pdl: bool | None = None):
    """Top-k of every row of val (R, L) fp32 or bf16 (last dim contiguous), k <= L. Returns (vals fp32, idx int32),
    each (R, k): the entries above the k-th value in index order, then the lowest-index entries equal to it in index
    order (module docstring); -inf / -1 where a row has fewer than k visible entries. workspace: a SelectWorkspace
    (one is allocated, zeroed, when None; its parts are replaced when too small for this call).
    digit_bits (DB): 4 or 8; default 8 with several programs per row (decode), 4 with one (prefill).
    block: entries per loop step of a program, a power of two (default 2048; 64 in the interpreter).
    out: (vals, idx) (R, k) fp32 / int32 views to write into (last dim contiguous, same row stride).
    one_launch: the NL digit launches and the emit as one launch with a grid barrier per level (_select_one_launch;
    every program must be resident at once: one_launch_plan, True caps P at SMs // R, None takes it where the P R
    programs fit as they are). The Triton interpreter runs program instances one after another, so there it runs
    the same levels as separate launches. asm_stores: the emit's scattered stores as inline PTX (asm_stores_on).
    first_level=1: digit 0 is already counted in the workspace, with its suffix counts, by the launch that wrote the
    rows (indexer_scores_triton level0) for these programs and chunks (block = the chunk, digit_bits = 8): the digit
    launches start at digit 1 (one launch only where those programs are all resident: P R <= the SMs).
    pdl: the launches start early, programmatic dependent launch (pdl_on; None: PDL)."""
    R, L, oval, oidx = rows_and_outputs("radix_select", val, k, out)
    if first_level not in (0, 1):
        raise ValueError(f"radix_select: first_level={first_level}; allowed: 0, 1")
    if first_level and (workspace is None or programs is None or block is None or digit_bits != 8):
        raise ValueError("radix_select: first_level=1 needs the workspace, programs, block (the chunk) and "
                         f"digit_bits=8 of the launch that counted digit 0; got workspace={type(workspace).__name__}, "
                         f"programs={programs}, block={block}, digit_bits={digit_bits}")
    P = default_programs(R, L) if programs is None else max(1, int(programs))
    one_launch, P = one_launch_plan("radix_select", one_launch, R, P, first_level, val.device)
    DB = (8 if P > 1 else 4) if digit_bits is None else int(digit_bits)
    if DB not in (4, 8):
        raise ValueError(f"radix_select: digit_bits={DB}; allowed: 4, 8")
    if workspace is not None and not isinstance(workspace, SelectWorkspace):
        raise TypeError(f"radix_select: workspace is a {type(workspace).__name__}; allowed: SelectWorkspace, None")
    NL = digit_levels(val.dtype, DB)
    if R == 0:
        return oval, oidx
    BLOCK = int(block) if block is not None else (64 if INTERPRET else 2048)
    P, C = level_chunks("radix_select", L, P, BLOCK, first_level)           # P <= the P asked for
    ws = workspace if workspace is not None else SelectWorkspace(R, P, val.device)
    ws.fit_select(R, P, NL, DB, val.device)
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    if one_launch and not INTERPRET:
        _select_one_launch[(P, R)](val, ws.hist, ws.scratch, oval, oidx, L, C, P, val.stride(0), oval.stride(0), Tq,
                                   q0, k, NL=NL, DB=DB, RATIO=ratio, BLOCK=BLOCK, QB=128, FIRST=first_level,
                                   ASM=asm_stores_on(asm_stores), num_warps=num_warps,
                                   launch_cooperative_grid=cooperative_on(val.device))
        return oval, oidx
    on = pdl_on(pdl, val.device)
    modes = pdl_modes(NL - first_level + 1, on)
    for lev in range(first_level, NL):
        _hist_level[(P, R)](val, ws.hist, ws.scratch, L, C, P, val.stride(0), Tq, q0, k, LEVEL=lev, NL=NL, DB=DB,
                            RATIO=ratio, BLOCK=BLOCK, PDL=modes[lev - first_level], num_warps=num_warps,
                            launch_pdl=on)
    _emit[(P, R)](val, ws.hist, ws.scratch, oval, oidx, L, C, P, val.stride(0), oval.stride(0), Tq, q0, k, NL=NL,
                  DB=DB, RATIO=ratio, BLOCK=BLOCK, QB=128, ASM=asm_stores_on(asm_stores), PDL=modes[-1],
                  num_warps=num_warps, launch_pdl=on)
    return oval, oidx


__all__ = ["radix_select", "default_programs", "digit_levels", "chunks", "SelectWorkspace", "cooperative_on",
           "one_launch_plan"]
