"""Row select: exact top-k of short rows, each row held in one program's registers (docs/kernels.md §3).

    row_select(val, k, frontier=None) -> (vals (R, k) fp32, idx (R, k) int32)

Made for prefill, where there are many score rows of at most a few ten thousand entries (at 128K context and ratio 4
a row has at most 32K visible entries): one program per row loads the row once, keeps its keys in registers and
finds the threshold t = the k-th largest key by bisection, one key bit per step, MSB first:

    keys      s = the order-preserving signed int32 image of the fp32 value (bf16 values are widened exactly; -0.0 has
              the key of +0.0), shifted right by LOW = 16 for bf16 rows (their low 16 key bits carry no order)
    bisect    t = the smallest key; for each bit b from the top: if #(s >= t | 2^b) >= k then t = t | 2^b
              (32 steps for fp32 rows, 16 for bf16 rows; each one compare and one sum over the row in registers)
    emit      the entries > t in index order at slots [0, k - r), then the r lowest-index entries == t in index order
              (r = k - #(> t)); positions by tl.cumsum over the row

So the output is radix_select's (select.py), slot for slot: the naive twin's set of picks (stable sort: ties to the
lower index), deterministic, one launch, no workspace, no atomics, no host synchronisation (CUDA-graph safe). Picks
of value -inf report index -1; a row with n <= k visible entries takes all of them in index order (slot = column;
slots >= n: -1 / -inf). frontier=(Tq, q0, ratio): row r = b Tq + i has n_r = min(L, (q0 + i + 1) // ratio) visible
entries (the columns after them are never read); None: every row has L.

Against radix_select's one-program-per-row prefill mode (one histogram launch per 4-bit digit, each re-reading the
row, tl.histogram's warp ballots) it reads each row once from memory and replaces the histograms by compares and
sums. Its limit is the row length: the whole row must fit in one program's registers (MAX_L entries; longer rows:
radix_select, which splits a row over many programs).
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, jit, next_pow2, tl, triton
from .select import _pick_bin, _row_len, _store_picks, _take_all, _ukey, asm_stores_on, rows_and_outputs

MAX_L = 32768                                 # longest row one program holds (int32 keys: 64 per thread at 16 warps)


@jit
def _keys(x, m, LOW: tl.constexpr):
    """Signed order-preserving keys of fp32 x, >> LOW; masked entries get the smallest key (below every real one)."""
    return tl.where(m, (_ukey(x) ^ -2147483648) >> LOW, -(1 << (31 - LOW)))


@jit
def _kth_key(s, k, NB: tl.constexpr):
    """The k-th largest of the 1-D keys s (NB bits; k <= #entries above the mask key), by bisection: the sign bit,
    then every lower bit MSB first, one compare and one sum per bit (the steps are latency-bound, a block-wide sum
    and a branch each; wider steps, several bits per step, measured slower: docs/kernels.md §3)."""
    t = tl.full([], -(1 << (NB - 1)), tl.int32)                               # the smallest key: never a real one
    if tl.sum((s >= 0).to(tl.int32), 0) >= k:                                 # the sign bit of the key
        t = tl.full([], 0, tl.int32)
    for b in tl.static_range(NB - 2, -1, -1):                                 # then every lower bit, MSB first
        cand = t | (1 << b)
        if tl.sum((s >= cand).to(tl.int32), 0) >= k:
            t = cand
    return t


@jit
def _kth_key_hist(s, k, NB: tl.constexpr, DB: tl.constexpr):
    """_kth_key by digits: the k-th largest of the 1-D keys s (NB bits, NB a multiple of DB; k <= #entries), DB key
    bits per step from a 2^DB-bin tl.histogram of the entries that share the digits found so far (radix select in
    registers: select.py's _prefix on one program's keys, the same step, _pick_bin): NB / DB steps instead of NB,
    each a histogram, a suffix sum over its bins and a max."""
    NBIN: tl.constexpr = 1 << DB
    if NB == 32:
        u = s ^ -2147483648                            # unsigned order in the bits (digits masked after the shift)
    else:
        u = s + (1 << (NB - 1))                        # [0, 2^NB)
    bins = tl.arange(0, NBIN)
    pref = tl.full([], 0, tl.int32)
    krem = k + pref
    for lev in tl.static_range(NB // DB):
        SH = NB - DB * (lev + 1)
        if lev == 0:
            h = tl.histogram((u >> SH) & (NBIN - 1), NBIN)
        else:
            h = tl.histogram((u >> SH) & (NBIN - 1), NBIN, mask=(u >> (SH + DB)) == (pref >> (SH + DB)))
        b, krem = _pick_bin(h, bins, krem)
        pref = pref | (b << SH)
    if NB == 32:
        t = pref ^ -2147483648
    else:
        t = pref - (1 << (NB - 1))
    return t


@jit
def _row_select(VAL, OVAL, OIDX, L, sv, so, Tq, q0, k, RATIO: tl.constexpr, LOW: tl.constexpr,
                BLOCK: tl.constexpr, ASM: tl.constexpr):
    row = tl.program_id(0)
    n = _row_len(row, L, Tq, q0, RATIO)
    offs = tl.arange(0, BLOCK)
    vrow = VAL + row.to(tl.int64) * sv
    obase = row.to(tl.int64) * so
    if n <= k:                                         # every visible entry is a pick: slot = column, rest -1
        _take_all(vrow, offs, n, k, OVAL, OIDX, obase)
    else:
        m = offs < n
        s = _keys(tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32), m, LOW)   # beyond the frontier: below all
        t = _kth_key(s, k, 32 - LOW)
        # the values are loaded again (L2-resident) rather than kept live through the bisection: only the keys
        # occupy registers there (a 32K-entry row: 64 per thread at 16 warps)
        v = tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32)
        is_gt = s > t                                                         # (masked entries are below t)
        n_gt = tl.sum(is_gt.to(tl.int32), 0)                                  # < k by the choice of t
        zero = tl.full([], 0, tl.int32)
        _store_picks(v, offs, is_gt, m & (s == t), zero, zero, n_gt, k, OVAL, OIDX, obase, ASM)


def row_select(val: torch.Tensor, k: int, frontier: tuple[int, int, int] | None = None,
               out: tuple[torch.Tensor, torch.Tensor] | None = None, num_warps: int | None = None,
               asm_stores: bool | None = None):
    """Top-k of every row of val (R, L) fp32 or bf16 (last dim contiguous), 1 <= k <= L <= MAX_L. Returns (vals fp32,
    idx int32), each (R, k), in radix_select's slot order (module docstring). out: (vals, idx) (R, k) fp32 / int32
    views to write into (last dim contiguous, same row stride). num_warps: default from the row length. asm_stores:
    the picks' stores as inline PTX (select.py asm_stores_on)."""
    R, L, oval, oidx = rows_and_outputs("row_select", val, k, out)
    if L > MAX_L:
        raise ValueError(f"row_select: row length L={L}; allowed: L <= {MAX_L} (longer rows: radix_select)")
    if R == 0:
        return oval, oidx
    BLOCK = max(16, next_pow2(L))
    if num_warps is None:                              # ~32 keys per thread, 4..16 warps
        num_warps = 4 if INTERPRET else min(16, max(4, BLOCK // 1024))
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    _row_select[(R,)](val, oval, oidx, L, val.stride(0), oval.stride(0), Tq, q0, k, RATIO=ratio,
                      LOW=16 if val.dtype == torch.bfloat16 else 0, BLOCK=BLOCK, ASM=asm_stores_on(asm_stores),
                      num_warps=num_warps)
    return oval, oidx


__all__ = ["row_select", "MAX_L"]
