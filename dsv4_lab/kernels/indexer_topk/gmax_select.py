"""Prefill top-k by a group-max threshold: one compare-and-compact pass per row, then a sort of a few candidates
(docs/kernels.md §3). Exact; ties go to the lower index.

    gmax_select(val, gmax, group, k, frontier=None, cap=None) -> (vals (R, k) fp32, idx (R, k) int32), sorted

val (R, L) fp32 or bf16 scores; gmax (R, >= ceil(L / group)) fp32: the max of every `group` consecutive entries of
each row before any rounding (indexer_scores_triton's group output). One program per row:

  1. t0 = the k-th largest of the row's group maxima (rounded to val's dtype, which keeps their order): k groups
     hold an entry >= t0, so at least k entries are >= t0 and the row's k-th largest value is >= t0. With groups of
     g entries and about 2k groups per row, only ~1.4 k entries are >= t0 on random rows (P(x >= t0) ~ ln 2 / g).
  2. one pass over the row writes the entries >= t0, in index order, to a per-row scratch of `cap` slots
     (a compare, a prefix sum and a rare store per entry: no histogram, ~bandwidth-bound).
  3. the candidates are packed into int64 keys (order-preserving value bits << 32 | (2^32 - 1 - index)), sorted,
     and the first k written: sorted by score, equal scores by lower index, -1 / -inf where the row has fewer than k
     visible entries.
  If more than `cap` entries are >= t0 (many ties at the top), the program falls back to an exact radix select
  over the whole row (8-bit digit histograms, then an in-order compaction) -- slower, same result.

frontier=(Tq, q0, ratio): row r = b Tq + i has n_r = min(L, (q0 + i + 1) // ratio) visible entries (never reads
past them); None: every row has L. group must be a power of two.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, next_pow2, tl, triton


@triton.jit
def _okey(v):
    """Order-preserving signed int32 image of fp32 v (-0.0 ties with +0.0, as in torch)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _fallback_threshold(vrow, n, k, NL: tl.constexpr, BLOCK: tl.constexpr):
    """Exact k-th largest key of vrow[0:n] by 8-bit digit histograms over the whole row: (threshold as a signed
    ordered key with the low 32 - 8 NL bits zero, how many picks equal it at that precision)."""
    bins = tl.arange(0, 256)
    pref = k * 0
    krem = k
    for l in tl.static_range(NL):
        SH = 24 - 8 * l                                    # a constexpr: l comes from static_range
        hist = tl.zeros([256], tl.int32)
        for st in range(0, n, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < n
            u = _okey(tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32)) ^ -2147483648
            if l > 0:
                m = m & ((u >> (SH + 8)) == (pref >> (SH + 8)))
            hist += tl.histogram((u >> SH) & 255, 256, mask=m)
        cge = tl.cumsum(hist, 0, reverse=True)
        b = tl.max(tl.where(cge >= krem, bins, 0), 0)
        krem = krem - tl.sum(tl.where(bins > b, hist, 0), 0)
        pref = pref | (b << SH)
    return pref ^ -2147483648, krem


@triton.jit
def _sort_store(cv, ci, cm, OVAL, OIDX, obase, j, K: tl.constexpr):
    """Sort the entries cv (values) / ci (indices) where cm by (value desc, index asc) and store the first K; -inf
    values get index -1."""
    key = _okey(cv).to(tl.int64) * 4294967296 + (4294967295 - ci.to(tl.int64))
    key = tl.where(cm, key, -9223372036854775807)
    key = tl.sort(key, descending=True)
    o = (key >> 32).to(tl.int32)
    vs = (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    ix = (4294967295 - (key & 4294967295)).to(tl.int32)
    ok = (key != -9223372036854775807) & (vs != float("-inf"))
    tl.store(OVAL + obase + j, tl.where(ok, vs, float("-inf")), mask=j < K)
    tl.store(OIDX + obase + j, tl.where(ok, ix, -1), mask=j < K)


@triton.jit
def _gmax_select_fwd(VAL, GM, SV, SI, OVAL, OIDX, L, sv, sg, so, Tq, q0, k, GROUP: tl.constexpr,
                     GP: tl.constexpr, K: tl.constexpr, CAP: tl.constexpr, NL: tl.constexpr, RATIO: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if RATIO > 0:
        n = tl.minimum((q0 + row % Tq + 1) // RATIO, L).to(tl.int32)
    else:
        n = L
    vrow = VAL + row * sv
    obase = row * so
    j = tl.arange(0, CAP)
    if n <= K:                                          # every visible entry is a pick
        cv = tl.load(vrow + j, mask=j < n, other=float("-inf")).to(tl.float32)
        _sort_store(cv, j, j < n, OVAL, OIDX, obase, j, K)
    else:
        # 1. t0 = the K-th largest group max among the row's ceil(n / GROUP) groups (in val's precision)
        G = (n + GROUP - 1) // GROUP
        gi = tl.arange(0, GP)
        gmv = tl.load(GM + row * sg + gi, mask=gi < G, other=float("-inf"))
        gmv = gmv.to(VAL.dtype.element_ty).to(tl.float32)
        if GP >= K:
            gs = tl.sort(gmv, descending=True)
            t0 = tl.sum(tl.where(gi == K - 1, gs, 0.0), 0)
            o0 = tl.where(G >= K, _okey(t0), -2139095041)                    # fewer than K groups: t0 = -inf
        else:
            o0 = n * 0 - 2139095041                                           # ordered key of -inf
        # 2. entries >= t0 into the scratch, in index order
        sbase = row * CAP
        seen = n * 0
        for st in range(0, n, BLOCK):
            offs = st + tl.arange(0, BLOCK)
            m = offs < n
            v = tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32)
            cand = m & (_okey(v) >= o0)
            c = cand.to(tl.int32)
            nc = tl.sum(c, 0)
            if nc > 0:
                pos = seen + tl.cumsum(c, 0) - 1
                keep = cand & (pos < CAP)
                tl.store(SV + sbase + pos, v, mask=keep)
                tl.store(SI + sbase + pos, offs, mask=keep)
            seen += nc
        if seen > CAP:
            # fallback: exact threshold by histograms, then every entry above it and the first krem equal to it
            # (index order) into the first k scratch slots; the sort below orders them
            tl.debug_barrier()                          # after the candidate pass's scratch writes
            tho, krem = _fallback_threshold(vrow, n, k, NL, BLOCK)
            SH: tl.constexpr = 32 - 8 * NL
            n_gt = k - krem
            ngt_seen = n * 0
            neq_seen = n * 0
            for st in range(0, n, BLOCK):
                offs = st + tl.arange(0, BLOCK)
                m = offs < n
                v = tl.load(vrow + offs, mask=m, other=0.0).to(tl.float32)
                ok_ = _okey(v)
                if SH > 0:
                    gt = m & ((ok_ >> SH) > (tho >> SH))
                    eq = m & ((ok_ >> SH) == (tho >> SH))
                else:
                    gt = m & (ok_ > tho)
                    eq = m & (ok_ == tho)
                gpos = ngt_seen + tl.cumsum(gt.to(tl.int32), 0) - 1
                epos = neq_seen + tl.cumsum(eq.to(tl.int32), 0) - 1
                sel = gt | (eq & (epos < krem))
                pos = tl.where(gt, gpos, n_gt + epos)
                tl.store(SV + sbase + pos, v, mask=sel)
                tl.store(SI + sbase + pos, offs, mask=sel)
                ngt_seen += tl.sum(gt.to(tl.int32), 0)
                neq_seen += tl.sum(eq.to(tl.int32), 0)
            seen = n * 0 + k
        # 3. sort the candidates by (score desc, index asc); the first K are the picks
        tl.debug_barrier()                              # the scratch was written by other threads of this program
        cm = j < seen
        cv = tl.load(SV + sbase + j, mask=cm, other=float("-inf"), volatile=True)
        ci = tl.load(SI + sbase + j, mask=cm, other=0, volatile=True)
        _sort_store(cv, ci, cm, OVAL, OIDX, obase, j, K)


def gmax_group(L: int, k: int) -> int:
    """Group size for rows of up to L entries: about 2k groups per row, a power of two in [1, 32] (16 when
    interpreting: the score kernel's interpreter tiles hold 16 columns)."""
    return max(1, min(16 if INTERPRET else 32, next_pow2(-(-max(L, 1) // (2 * next_pow2(k))))))


def gmax_select(val: torch.Tensor, gmax: torch.Tensor, group: int, k: int,
                frontier: tuple[int, int, int] | None = None, cap: int | None = None, out=None):
    """Top-k of every row of val (R, L) fp32 or bf16 (last dim contiguous), 1 <= k <= L, given the row-wise group
    maxima gmax (R, >= ceil(L / group)) fp32. Returns (vals fp32, idx int32), each (R, k), sorted by score (ties:
    lower index first); -inf / -1 where a row has fewer than k visible entries. cap: candidate slots per row
    (default max(4096, 2 next_pow2(k)), 64 when interpreting; a power of two >= next_pow2(k)).
    out: (vals, idx) (R, k) views to write into (same strides, last dim contiguous)."""
    check_device(val, gmax)
    R, L = val.shape
    if val.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"gmax_select: val.dtype={val.dtype}; allowed: torch.float32, torch.bfloat16")
    if not 0 < k <= L:
        raise ValueError(f"gmax_select: k={k}; allowed: 1 <= k <= L = {L}")
    if group < 1 or group & (group - 1):
        raise ValueError(f"gmax_select: group={group}; allowed: a power of two")
    assert val.stride(-1) == 1 and gmax.stride(-1) == 1 and gmax.shape[0] == R
    KP = next_pow2(k)
    CAP = max(64 if INTERPRET else 4096, 2 * KP) if cap is None else int(cap)
    if CAP < KP or CAP & (CAP - 1):
        raise ValueError(f"gmax_select: cap={CAP}; allowed: a power of two >= {KP}")
    if out is None:
        oval = torch.empty(R, k, dtype=torch.float32, device=val.device)
        oidx = torch.empty(R, k, dtype=torch.int32, device=val.device)
    else:
        oval, oidx = out
        assert oval.shape == oidx.shape == (R, k) and oval.stride() == oidx.stride() and oval.stride(-1) == 1
    if R == 0:
        return oval, oidx
    sv = torch.empty(R * CAP, dtype=torch.float32, device=val.device)
    si = torch.empty(R * CAP, dtype=torch.int32, device=val.device)
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    GP = next_pow2(-(-L // group))
    _gmax_select_fwd[(R,)](val, gmax, sv, si, oval, oidx, L, val.stride(0), gmax.stride(0), oval.stride(0),
                           Tq, q0, k, GROUP=group, GP=GP, K=k, CAP=CAP,
                           NL=2 if val.dtype == torch.bfloat16 else 4, RATIO=ratio,
                           BLOCK=64 if INTERPRET else 2048, num_warps=8)
    return oval, oidx


__all__ = ["gmax_select", "gmax_group"]
