"""Lightning-indexer scores + top-k in Triton (docs §2.4; same interface as naive.py; forward only). Entry point:
indexer_topk_triton(..., method=) (its docstring lists the methods; AUTO picks one for prefill and for decode).

  indexer_scores_triton  score kernel: (query chunk x visible key range) fp32 scores, causal tile skipping
  radix_topk_triton      exact radix-select top-k of fp32 rows (one or two stages), lower-index ties
  _indexer_topk_stream   method="stream": the first, fused streaming kernel (measured 865 ms at 128K on the H200,
                         kept for comparison), described next.

Streaming kernel: one program owns BQ queries x all HI indexer heads (BQ * HIP rows of the score tl.dot). It walks the visible
compressed entries BS at a time, forms I = sum_h w_h ReLU(q_h . k) in registers, packs each score with its index
into one int64 key (order-preserving fp32 bits << 32 | (2^32 - 1 - s), so equal scores prefer the lower index:
the same tie rule as the naive twin's stable sort), and merges the chunk into a running, sorted top-KP list with
tl.topk over the concatenation. The [T, S] score matrix never touches memory (docs/kernels.md §3, T4/T5): memory
traffic is the keys (re-read from L2 per query block), q, w and the k outputs.

A chunk is skipped without the merge when none of its keys beats the current k-th best of any query in the block.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, configs, dot_dtype, next_pow2, tl, triton

NEG_INF_KEY = -2139095041 * (1 << 32)          # key of a -inf score: below every finite score's key


@triton.jit
def _keys(sc, s):
    bits = sc.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)                             # -0.0 ties with +0.0 (as in torch)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)                     # monotone signed-int image of the float
    return ordered.to(tl.int64) * 4294967296 + (4294967295 - s.to(tl.int64))


# num_stages=1: a pipelined fp32 key tile (BS x 64 x 4 B) overflowed shared memory (299 KB > 227 KB) on the H200
@triton.autotune(configs=configs([triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)],
                                 triton.Config({}, num_warps=4, num_stages=1)),
                 key=["HI", "DI", "K_TOP", "RATIO", "BQ"])
@triton.jit
def _indexer_topk_fwd(QI, KI, WT, IDX, VAL, T, S, q_offset,
                      sqb, sqt, sqh, skb, sks, swb, swt, sib, sit,
                      HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BLOCK_D: tl.constexpr,
                      K_TOP: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr, BQ: tl.constexpr,
                      RATIO: tl.constexpr, DOT_DT: tl.constexpr):
    R: tl.constexpr = BQ * HIP
    t0 = tl.program_id(0) * BQ
    b = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, R)
    tr = t0 + r // HIP
    hr = r % HIP
    rmask = (tr < T) & (hr < HI)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < DI
    q = tl.load(QI + b * sqb + tr.to(tl.int64)[:, None] * sqt + hr[:, None] * sqh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    qd = q.to(DOT_DT)
    wr = tl.load(WT + b * swb + tr.to(tl.int64) * swt + hr, mask=rmask, other=0.0).to(tl.float32)
    tq = t0 + tl.arange(0, BQ)
    nvis_q = tl.minimum((q_offset + tq + 1) // RATIO, S)                       # (BQ,)
    t_last = tl.minimum(t0 + BQ, T) - 1
    nvis = tl.minimum((q_offset + t_last + 1) // RATIO, S)
    run = tl.full([BQ, KP], -9187343241974906880, tl.int64)                    # NEG_INF_KEY: empty slots
    for s0 in range(0, nvis, BS):
        s = s0 + tl.arange(0, BS)
        smask = s < nvis
        kb = tl.load(KI + b * skb + s.to(tl.int64)[:, None] * sks + offs_d[None, :],
                     mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        logit = tl.dot(qd, tl.trans(kb.to(DOT_DT)))                             # (R, BS)
        logit = tl.maximum(logit, 0.0) * wr[:, None]
        sc = tl.sum(tl.reshape(logit, [BQ, HIP, BS]), 1)                        # (BQ, BS)
        sc = tl.where(s[None, :] < nvis_q[:, None], sc, float("-inf"))
        keys = _keys(sc, s[None, :])
        if BS > KP:
            keys = tl.topk(keys, KP)
        thr = tl.min(run, 1)
        better = tl.max(keys, 1) > thr
        if tl.max(better.to(tl.int32), 0) > 0:
            run = tl.topk(tl.reshape(tl.join(run, keys), [BQ, 2 * KP]), KP)
    ordered = (run >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    val = bits.to(tl.float32, bitcast=True)
    sidx = (4294967295 - (run & 4294967295)).to(tl.int32)
    valid = ordered > -2139095041
    sidx = tl.where(valid, sidx, -1)
    val = tl.where(valid, val, float("-inf"))
    kk = tl.arange(0, KP)
    om = (tq[:, None] < T) & (kk[None, :] < K_TOP)
    off = b * sib + tq.to(tl.int64)[:, None] * sit + kk[None, :]
    tl.store(IDX + off, sidx, mask=om)
    tl.store(VAL + off, val, mask=om)


def _indexer_topk_stream(qI, kI, w, k: int, ratio: int, q_offset: int = 0, return_scores: bool = False):
    check_device(qI, kI, w)
    B, T, HI, DI = qI.shape
    S = kI.shape[1]
    assert kI.shape == (B, S, DI) and w.shape == (B, T, HI), "qI (B, T, HI, DI), kI (B, S, DI), w (B, T, HI)"
    qI = qI.contiguous()
    kI = kI.contiguous()
    w = w.contiguous()
    idx = torch.empty(B, T, k, dtype=torch.int32, device=qI.device)
    val = torch.empty(B, T, k, dtype=torch.float32, device=qI.device)
    if T > 0 and k > 0:
        HIP = next_pow2(HI)
        KP = next_pow2(k)
        BQ = max(1, 16 // HIP) if KP <= 512 else max(1, 16 // HIP)
        BS = max(KP, 32)
        _indexer_topk_fwd[(triton.cdiv(T, BQ), B)](
            qI, kI, w, idx, val, T, S, q_offset,
            qI.stride(0), qI.stride(1), qI.stride(2), kI.stride(0), kI.stride(1), w.stride(0), w.stride(1),
            idx.stride(0), idx.stride(1),
            HI=HI, HIP=HIP, DI=DI, BLOCK_D=max(16, next_pow2(DI)), K_TOP=k, KP=KP, BS=BS, BQ=BQ, RATIO=ratio,
            DOT_DT=dot_dtype(qI))
    return (idx, val) if return_scores else idx


# ================================================================================================ score kernel
# I[t, s] = sum_h w[t, h] ReLU(qI[t, h] . kI[s]) for one query chunk [t0, t1) over the chunk's visible key range
# [0, S'), S' = floor((q_offset + t1) / ratio) clipped to S. One program: BLOCK_M queries x all HI heads (BLOCK_M * HIP
# rows of one tl.dot, bf16 operands on the GPU, fp32 accumulate) against BLOCK_N keys; ReLU * w * sum over heads in
# registers. Key tiles entirely beyond the query tile's causal frontier are not computed, only filled with -inf.
# The grid is (key tiles, query tiles, B) with the key tiles fastest, so at decode (one query) the S keys are spread
# over all SMs (docs/kernels.md §8.4: the key stream is the cost).
def _score_configs():
    gpu = [triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=ns)
           for bn, nw, ns in ((64, 4, 2), (128, 8, 2), (128, 8, 3))]     # none spills registers
    return configs(gpu, triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1))


@triton.autotune(configs=_score_configs(), key=["HIP", "DI", "BLOCK_M", "RATIO"])
@triton.jit
def _indexer_scores_fwd(QI, KI, WT, OUT, GM, Tq, Sp, t0, q_offset,
                        sqb, sqt, sqh, skb, sks, swb, swt, sob, sot, sgb, sgt,
                        HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RATIO: tl.constexpr, DOT_DT: tl.constexpr,
                        FILL: tl.constexpr, GROUP: tl.constexpr):
    R: tl.constexpr = BLOCK_M * HIP
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    im = m0 + tl.arange(0, BLOCK_M)                                            # chunk-local query rows
    s = n0 + tl.arange(0, BLOCK_N)
    nvis_m = tl.minimum((q_offset + t0 + im + 1) // RATIO, Sp)                  # (BLOCK_M,) visible per query
    nvis_last = tl.minimum((q_offset + t0 + tl.minimum(m0 + BLOCK_M, Tq)) // RATIO, Sp)
    off = b * sob + im.to(tl.int64)[:, None] * sot + s[None, :]
    omask = (im < Tq)[:, None] & (s < Sp)[None, :]
    if n0 < nvis_last:
        r = tl.arange(0, R)
        tr = t0 + m0 + r // HIP
        hr = r % HIP
        rmask = (m0 + r // HIP < Tq) & (hr < HI)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < DI
        q = tl.load(QI + b * sqb + tr.to(tl.int64)[:, None] * sqt + hr[:, None] * sqh + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        kt = tl.load(KI + b * skb + s.to(tl.int64)[:, None] * sks + offs_d[None, :],
                     mask=(s < nvis_last)[:, None] & dmask[None, :], other=0.0)
        wr = tl.load(WT + b * swb + tr.to(tl.int64) * swt + hr, mask=rmask, other=0.0).to(tl.float32)
        logit = tl.dot(q.to(DOT_DT), tl.trans(kt.to(DOT_DT)))                  # (R, BLOCK_N) fp32
        logit = tl.maximum(logit, 0.0) * wr[:, None]
        sc = tl.sum(tl.reshape(logit, [BLOCK_M, HIP, BLOCK_N]), 1)              # (BLOCK_M, BLOCK_N)
        sc = tl.where(s[None, :] < nvis_m[:, None], sc, float("-inf"))
        tl.store(OUT + off, sc.to(OUT.dtype.element_ty), mask=omask)          # fp32, or bf16 (rounded once)
        if GROUP > 0:                              # max of every GROUP consecutive entries (radix prefilter)
            NG: tl.constexpr = BLOCK_N // GROUP
            gm = tl.max(tl.reshape(sc, [BLOCK_M, NG, GROUP]), 2)
            gi = n0 // GROUP + tl.arange(0, NG)
            tl.store(GM + b * sgb + im.to(tl.int64)[:, None] * sgt + gi[None, :], gm,
                     mask=(im < Tq)[:, None] & (gi < (Sp + GROUP - 1) // GROUP)[None, :])
    else:
        if FILL:                                   # FILL=False: the reader stops at each row's frontier (radix)
            tl.store(OUT + off, tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32).to(OUT.dtype.element_ty),
                     mask=omask)


def _visible(ratio: int, q_offset: int, t1: int, S: int) -> int:
    return max(0, min(S, (q_offset + t1) // ratio))


def indexer_scores_triton(qI, kI, w, ratio: int, q_offset: int = 0, t0: int = 0, t1: int | None = None,
                          s1: int | None = None, out: torch.Tensor | None = None, fill: bool = True, config=None,
                          gmax: torch.Tensor | None = None, group: int = 0, dtype: torch.dtype = torch.float32,
                          pad: int = 1):
    """(B, t1 - t0, S') scores of queries t0..t1-1 (positions q_offset + t), invisible entries -inf; `dtype` fp32,
    or bf16 (the fp32 sum over heads rounded once to nearest: half the bytes written and read by the top-k).

    S' = s1 if given, else the chunk's visible range floor((q_offset + t1) / ratio) (clipped to S): the keys beyond it
    are invisible to every query of the chunk and are neither read nor written. `out` may be a preallocated buffer
    of at least that size (reused across chunks). fill=False leaves the key tiles that lie wholly beyond a query
    tile's causal frontier unwritten (for readers that stop at each row's frontier, as the radix top-k does).
    config: one triton.Config of the autotune list to run instead of the tuned choice (tests of every config).
    group > 0: also write gmax (B, t1 - t0, ceil(S' / group)) (a flat buffer of at least that size), the max of every
    `group` consecutive scores (group a power of two <= 32; groups in skipped tiles are left unwritten).
    pad: rows of `out` start every ceil(S' / pad) * pad elements (pad 64: aligned rows, so readers load whole
    16-byte vectors); the result is then a (B, t1 - t0, S') view of the padded rows."""
    check_device(qI, kI, w)
    B, T, HI, DI = qI.shape
    S = kI.shape[1]
    assert kI.shape == (B, S, DI) and w.shape == (B, T, HI), "qI (B, T, HI, DI), kI (B, S, DI), w (B, T, HI)"
    t1 = T if t1 is None else t1
    Tq = t1 - t0
    Sp = _visible(ratio, q_offset, t1, S) if s1 is None else min(int(s1), S)
    Spad = -(-Sp // pad) * pad
    if out is None:
        out = torch.empty(B, Tq, Spad, dtype=dtype, device=qI.device)[..., :Sp]
    else:
        out = out.view(dtype).view(-1)[: B * Tq * Spad].view(B, Tq, Spad)[..., :Sp]
    if Tq <= 0 or Sp <= 0:
        return out
    qI = qI if qI.stride(-1) == 1 else qI.contiguous()
    kI = kI if kI.stride(-1) == 1 else kI.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    HIP = next_pow2(HI)
    # rows of the dot = BLOCK_M * HIP: >= 16 (min dot size); 128 for prefill tiles, 16 when decoding a few queries
    # (interpreter: 16 rows, so tiny tests have several query tiles and exercise the causal tile skipping)
    BLOCK_M = max(1, (128 if Tq > 16 and not INTERPRET else 16) // HIP)
    grid = lambda META: (triton.cdiv(Sp, META["BLOCK_N"]), triton.cdiv(Tq, BLOCK_M), B)   # noqa: E731
    kern, extra = _indexer_scores_fwd, {}
    if config is not None:
        kern, extra = _indexer_scores_fwd.fn, dict(config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
    G = -(-Sp // group) if group else 0
    gm = gmax.view(-1)[: B * Tq * G].view(B, Tq, G) if group else out
    kern[grid](qI, kI, w, out, gm, Tq, Sp, t0, q_offset,
               qI.stride(0), qI.stride(1), qI.stride(2), kI.stride(0), kI.stride(1),
               w.stride(0), w.stride(1), out.stride(0), out.stride(1), gm.stride(0) if group else 0,
               gm.stride(1) if group else 0,
               HI=HI, HIP=HIP, DI=DI, BLOCK_D=max(16, next_pow2(DI)), BLOCK_M=BLOCK_M, RATIO=ratio,
               DOT_DT=dot_dtype(qI), FILL=fill, GROUP=group, **extra)
    return out


# ================================================================================================ radix top-k
# Exact top-k of fp32 rows by radix select (docs/kernels.md §3) over the order-preserving bits of the scores: 8-bit
# histogram passes find the k-th largest value v*; a compaction writes every entry > v* and the first (lowest-index)
# entries == v* in index order; the k picks are then sorted by (score desc, index asc) with tl.sort on packed int64
# keys. So ties follow the naive twin's rule exactly (lower index first), deterministically.
# Candidate shortcut: after the first pass over the row (and a second one if needed), the entries in or above the
# chosen bin are compacted, in index order, into a per-program scratch of CAP slots when they fit (typically k + a few
# hundred after the second pass); the exact select then restarts on those only: 2-3 reads of the row instead of 5.
# When they do not fit (e.g. many equal scores), the remaining passes read the row again.
# One program owns one column chunk [c*C, c*C + C) of one row and writes its top-K; with one chunk per row this is
# the whole top-k (prefill rows), with many chunks it is stage 1 of a two-stage top-k (decode: one very long row is
# split over many programs; stage 2 runs the same kernel over the chunks' candidates, HAS_IDX=True). Exact: the union
# of per-chunk top-k's contains the row's top-k.
@triton.jit
def _ordered(v):
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)                             # -0.0 ties with +0.0 (as in torch)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)                                 # monotone signed-int image of fp32


@triton.jit
def _radix_pass(VROW, c0, c1, pref, krem, SHIFT: tl.constexpr, NBITS: tl.constexpr, BLOCK: tl.constexpr,
                VOLATILE: tl.constexpr):
    """Histogram of bits [SHIFT, SHIFT + NBITS) of the entries whose higher bits equal pref's; picks the bin holding
    the krem-th largest. Returns (pref with that bin's bits set, krem minus the entries above the bin, bin count)."""
    NB: tl.constexpr = 1 << NBITS
    hist = tl.zeros([NB], tl.int32)
    for st in range(c0, c1, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        m = offs < c1
        u = _ordered(tl.load(VROW + offs, mask=m, other=0.0, volatile=VOLATILE)) ^ -2147483648   # unsigned order
        if SHIFT + NBITS < 32:
            m = m & ((u >> (SHIFT + NBITS)) == (pref >> (SHIFT + NBITS)))  # inside the bin chosen so far
        dig = (u >> SHIFT) & (NB - 1)
        hist += tl.histogram(dig, NB, mask=m)
    bins = tl.arange(0, NB)
    cge = tl.cumsum(hist, 0, reverse=True)                                  # entries in bins >= b
    bstar = tl.max(tl.where(cge >= krem, bins, 0), 0)
    above = tl.sum(tl.where(bins > bstar, hist, 0), 0)
    inbin = tl.sum(tl.where(bins == bstar, hist, 0), 0)
    return pref | (bstar << SHIFT), krem - above, inbin


@triton.jit
def _compact(VROW, IROW, c0, c1, thr, krem, n_gt, OIDX, OVAL, obase, HAS_I: tl.constexpr, BLOCK: tl.constexpr,
             VOLATILE: tl.constexpr):
    """Write every entry > thr and the first krem entries == thr (index order) to slots [0, n_gt + krem)."""
    ngt_seen = krem * 0
    neq_seen = krem * 0
    for st in range(c0, c1, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        m = offs < c1
        v = tl.load(VROW + offs, mask=m, other=0.0, volatile=VOLATILE)
        o = _ordered(v)
        gt = m & (o > thr)
        eq = m & (o == thr)
        gpos = ngt_seen + tl.cumsum(gt.to(tl.int32), 0) - 1
        epos = neq_seen + tl.cumsum(eq.to(tl.int32), 0) - 1
        sel = gt | (eq & (epos < krem))
        pos = tl.where(gt, gpos, n_gt + epos)
        if HAS_I:
            src = tl.load(IROW + offs, mask=sel, other=-1, volatile=VOLATILE)
        else:
            src = offs
        tl.store(OIDX + obase + pos, src.to(tl.int32), mask=sel)
        tl.store(OVAL + obase + pos, v, mask=sel)
        ngt_seen += tl.sum(gt.to(tl.int32), 0)
        neq_seen += tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _gather(VROW, IROW, c0, c1, lo, SV, SI, sbase, HAS_I: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """Copy the entries with ordered key >= lo, in index order, to the first CAP scratch slots; returns how many there
    are (more than CAP means the scratch holds only a prefix and must not be used)."""
    seen = c0 * 0
    for st in range(c0, c1, BLOCK):
        offs = st + tl.arange(0, BLOCK)
        m = offs < c1
        v = tl.load(VROW + offs, mask=m, other=0.0)
        cand = m & (_ordered(v) >= lo)
        pos = seen + tl.cumsum(cand.to(tl.int32), 0) - 1
        keep = cand & (pos < CAP)
        if HAS_I:
            src = tl.load(IROW + offs, mask=keep, other=-1)
        else:
            src = offs
        tl.store(SI + sbase + pos, src.to(tl.int32), mask=keep)
        tl.store(SV + sbase + pos, v, mask=keep)
        seen += tl.sum(cand.to(tl.int32), 0)
    return seen


@triton.jit
def _radix_topk_fwd(VAL, IDXIN, OVAL, OIDX, SV, SI, GM, THR, L, C, svr, sir, sor, ssr, sgr, sthr, Tq, q0,
                    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr,
                    SORT: tl.constexpr, RATIO: tl.constexpr, CAP: tl.constexpr, BLOCK_C: tl.constexpr,
                    GROUP: tl.constexpr, GP: tl.constexpr, GM_MAX: tl.constexpr, WRITE_THR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    Lr = L
    if RATIO > 0:                                    # row = b * Tq + i holds the query at position q0 + i
        Lr = tl.minimum(L, ((q0 + row % Tq + 1) // RATIO).to(tl.int32))
    c0 = c * C
    c1 = tl.minimum(c0 + C, Lr)
    n = tl.maximum(c1 - c0, 0)
    ksel = tl.minimum(n, K)
    vrow = VAL + row * svr
    irow = IDXIN + row * sir
    obase = row * sor + c.to(tl.int64) * K
    sbase = row * ssr + c.to(tl.int64) * CAP
    pref = ksel * 0
    krem = ksel
    ncand = ksel * 0 + (CAP + 1)
    if GP > 0:                                      # group-max prefilter (one chunk per row, GM from the scores)
        G = (c1 - c0 + GROUP - 1) // GROUP
        gi = tl.arange(0, GP)
        gmv = tl.load(GM + row * sgr + gi, mask=gi < G, other=float("-inf"))
        if GM_MAX:                               # GM = stage-1 chunks' k-th values: one chunk alone has K >= it
            t0v = tl.max(gmv, 0)
        else:
            gs = tl.sort(gmv, descending=True)
            t0v = tl.sum(tl.where(gi == ksel - 1, gs, 0.0), 0)              # ksel-th largest group max
            t0v = tl.where((ksel <= G) & (ksel > 0), t0v, float("-inf"))  # >= ksel entries are >= t0v
        ncand = _gather(vrow, irow, c0, c1, _ordered(t0v), SV, SI, sbase, HAS_IDX, BLOCK, CAP)
    if ncand > CAP:
        # 8-bit digits: tl.histogram costs ~(bins / 32) x bits ALU ops per element (warp ballots), so 8 bits, not 11
        pref, krem, inbin = _radix_pass(vrow, c0, c1, pref, krem, 24, 8, BLOCK, False)
        ncand = ksel - krem + inbin                                         # entries in or above the bin
        if ncand > CAP:                                                     # too many: refine the bin once more
            pref, krem, inbin = _radix_pass(vrow, c0, c1, pref, krem, 16, 8, BLOCK, False)
            ncand = ksel - krem + inbin
        if ncand <= CAP:
            tl.debug_barrier()                                               # after the speculative gather's writes
            ncand = _gather(vrow, irow, c0, c1, pref ^ -2147483648, SV, SI, sbase, HAS_IDX, BLOCK, CAP)
    if ncand <= CAP:
        tl.debug_barrier()                                                   # scratch is re-read by other threads
        # exact select restarted on the candidates (they hold the whole top-ksel)
        p2, k2, inbin = _radix_pass(SV + sbase, 0, ncand, ksel * 0, ksel, 24, 8, BLOCK_C, True)
        p2, k2, inbin = _radix_pass(SV + sbase, 0, ncand, p2, k2, 16, 8, BLOCK_C, True)
        p2, k2, inbin = _radix_pass(SV + sbase, 0, ncand, p2, k2, 8, 8, BLOCK_C, True)
        p2, k2, inbin = _radix_pass(SV + sbase, 0, ncand, p2, k2, 0, 8, BLOCK_C, True)
        tho = p2 ^ -2147483648
        _compact(SV + sbase, SI + sbase, 0, ncand, tho, k2, ksel - k2, OIDX, OVAL, obase, True, BLOCK_C, True)
    else:
        pref, krem, inbin = _radix_pass(vrow, c0, c1, pref, krem, 8, 8, BLOCK, False)
        pref, krem, inbin = _radix_pass(vrow, c0, c1, pref, krem, 0, 8, BLOCK, False)
        tho = pref ^ -2147483648
        _compact(vrow, irow, c0, c1, tho, krem, ksel - krem, OIDX, OVAL, obase, HAS_IDX, BLOCK, False)
    if WRITE_THR:                                # this chunk's k-th largest value (-inf if it holds fewer than K)
        tv = (tho ^ ((tho >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        tl.store(THR + row * sthr + c, tl.where(ksel == K, tv, float("-inf")))
    j = tl.arange(0, KP)
    if SORT:
        tl.debug_barrier()                                                   # the picks are re-read by other threads
        jm = j < ksel
        v = tl.load(OVAL + obase + j, mask=jm, other=float("-inf"), volatile=True)
        ix = tl.load(OIDX + obase + j, mask=jm, other=0, volatile=True)
        key = _ordered(v).to(tl.int64) * 4294967296 + (4294967295 - tl.maximum(ix, 0).to(tl.int64))
        key = tl.where(jm, key, -9223372036854775807)
        key = tl.sort(key, descending=True)
        o = (key >> 32).to(tl.int32)
        vs = (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        ixs = (4294967295 - (key & 4294967295)).to(tl.int32)
        ok = jm & (vs != float("-inf"))
        tl.debug_barrier()
        tl.store(OIDX + obase + j, tl.where(ok, ixs, -1), mask=j < K)
        tl.store(OVAL + obase + j, tl.where(ok, vs, float("-inf")), mask=j < K)
    else:                                                                    # stage 1: picks stay in index order
        tl.store(OIDX + obase + j, tl.full([KP], -1, tl.int32), mask=(j >= ksel) & (j < K))
        tl.store(OVAL + obase + j, tl.full([KP], float("-inf"), tl.float32), mask=(j >= ksel) & (j < K))


def radix_topk_triton(val, k: int, chunk: int | None = None, idx_in=None, sort: bool = True,
                      frontier: tuple[int, int, int] | None = None, cap: int | None = None,
                      gmax: torch.Tensor | None = None, group: int = 0, gmax_is_max: bool = False,
                      thr_out: torch.Tensor | None = None):
    """Top-k of each row of val (R, L) fp32 (last dim contiguous) by radix select. chunk=None: one program per row,
    returns (vals, idx) (R, k); else each chunk of `chunk` columns gives its own top-k: (R, ceil(L/chunk), k).
    idx_in (R, L) int32: source indices to report instead of column positions. -1 / -inf for missing slots.
    sort=False leaves each chunk's picks in index order (stage 1 of the two-stage top-k).
    frontier=(Tq, q0, ratio): row r = b * Tq + i only reads its visible columns [0, (q0 + i + 1) // ratio) (the rest
    of the row may be garbage); None: every row reads all L columns.
    cap: candidate scratch slots per program (default 4 * next_pow2(k), at least 1024; 0 = always re-read the row).
    gmax (R, >= ceil(L / group)): max of every `group` consecutive entries of each row (indexer_scores_triton's
    group output; one chunk per row only): the k-th largest group max t0 bounds the k-th largest entry from below, so
    the entries >= t0 (typically k + a few percent) are gathered in one pass and the histogram passes are skipped.
    gmax_is_max: gmax holds the stage-1 chunks' k-th largest values instead (group = k): t0 = their max.
    thr_out (R, nch) fp32: receives each chunk's k-th largest value (-inf where the chunk has fewer than k)."""
    check_device(val)
    R, L = val.shape
    assert val.stride(-1) == 1 and (idx_in is None or (idx_in.shape == val.shape and idx_in.stride(-1) == 1))
    C = L if chunk is None else int(chunk)
    nch = max(1, triton.cdiv(L, C)) if L > 0 else 1
    oval = torch.empty(R, nch, k, dtype=torch.float32, device=val.device)
    oidx = torch.empty(R, nch, k, dtype=torch.int32, device=val.device)
    Tq, q0, ratio = frontier if frontier is not None else (1, 0, 0)
    if R > 0 and k > 0:
        KP = next_pow2(k)
        cap = max(1024, 4 * KP) if cap is None else int(cap)
        if INTERPRET and cap:
            cap = max(16, next_pow2(cap))
        sv = torch.empty(R * nch * max(cap, 1), dtype=torch.float32, device=val.device)
        si = torch.empty(R * nch * max(cap, 1), dtype=torch.int32, device=val.device)
        BLOCK = 64 if INTERPRET else 4096                               # one compiled variant for all row lengths
        BLOCK_C = 64 if INTERPRET else min(1024, max(256, next_pow2(cap)))
        use_g = gmax is not None and group > 0 and nch == 1
        GP = next_pow2(-(-L // group)) if use_g else 0
        wt = thr_out is not None
        _radix_topk_fwd[(R, nch)](val, idx_in if idx_in is not None else oidx, oval, oidx, sv, si,
                                  gmax if use_g else val, thr_out if wt else val, L, max(C, 1),
                                  val.stride(0), idx_in.stride(0) if idx_in is not None else 0, oidx.stride(0),
                                  nch * max(cap, 1), gmax.stride(0) if use_g else 0, thr_out.stride(0) if wt else 0,
                                  Tq, q0, K=k, KP=KP, BLOCK=BLOCK,
                                  HAS_IDX=idx_in is not None, SORT=sort, RATIO=ratio, CAP=cap, BLOCK_C=BLOCK_C,
                                  GROUP=group if use_g else 1, GP=GP, GM_MAX=bool(gmax_is_max), WRITE_THR=wt,
                                  num_warps=16)        # BLOCK 4096: <= 128 regs (4 or 8 warps spill)
    return (oval[:, 0], oidx[:, 0]) if chunk is None else (oval, oidx)


# ================================================================================================ indexer + top-k
METHODS = ("gmax", "gmax_bf16", "select", "select_bf16", "torch_bf16", "radix", "radix_gmax", "torch", "split_torch",
           "stream")
# set from benchmarks/results/csa.json (H200): Triton scores + torch.topk was the fastest measured at
# 32K / 128K prefill (5.0 / 41.3 ms vs radix 8.1 / 67.7, radix_gmax 8.1 / 58.2) and at 1M decode (103 us vs radix
# 113 us); at 8K all are within 0.3 ms. In the model-level GPU test the radix path also dropped 0.26 % of the picks
# where k >= the visible count (not reproduced under the interpreter): see benchmarks/README.md
# Not yet measured on the GPU: select / select_bf16 / torch_bf16 (bench_csa.py measures all methods side by side);
# the methods that lose to the winner then leave the package (their numbers stay in benchmarks/README.md).
# "auto" never takes a bf16-score method for fp32 inputs: it takes its fp32-score twin (select, torch) instead.
AUTO = {"prefill": "torch", "decode": "torch"}
FP32_TWIN = {"gmax_bf16": "gmax", "select_bf16": "select", "torch_bf16": "torch"}
DECODE_T = 16                                        # T <= DECODE_T queries: decode methods (split the key range)


def _row_budget(Sp: int, rows: int, max_elems: int) -> int:
    return max(1, min(rows, max_elems // max(Sp, 1)))


def _topk_torch(sc, k, ordered: bool = True):
    """torch.topk of rows (R, L); ordered=False leaves the k picks in torch's unsorted order (the sparse kernels do not
    need them in order; on an H200 unsorted takes 67 vs 85 us on the 1M-context decode row, 6-10 % less in prefill:
    benchmarks/README.md)."""
    kk = min(k, sc.shape[-1])
    v, i = torch.topk(sc, kk, dim=-1, sorted=ordered)
    i = torch.where(v == float("-inf"), -1, i).to(torch.int32)
    return v, i


def _topk_split_torch(sc, k, chunk):
    """Two-stage exact top-k of rows (R, L): torch.topk per chunk of `chunk` columns, then of the candidates."""
    R, L = sc.shape
    if L <= chunk or L <= k:
        return _topk_torch(sc, k)
    n = triton.cdiv(L, chunk)
    if n * chunk != L:
        sc = torch.nn.functional.pad(sc, (0, n * chunk - L), value=float("-inf"))
    v, i = torch.topk(sc.view(R, n, chunk), min(k, chunk), dim=-1)                     # (R, n, k)
    i = i + (torch.arange(n, device=sc.device) * chunk)[None, :, None]
    v2, j = torch.topk(v.reshape(R, -1), k, dim=-1)
    i2 = torch.gather(i.reshape(R, -1), 1, j)
    return v2, torch.where(v2 == float("-inf"), -1, i2).to(torch.int32)


def _topk_radix(sc, k, split, frontier, cap, gmax=None, group=0):
    R, L = sc.shape
    if split is None or L <= max(split, 4 * k):
        return radix_topk_triton(sc, k, frontier=frontier, cap=cap, gmax=gmax, group=group)
    n = triton.cdiv(L, split)
    thr = torch.empty(R, n, dtype=torch.float32, device=sc.device)
    v1, i1 = radix_topk_triton(sc, k, chunk=split, sort=False, frontier=frontier, cap=cap, thr_out=thr)  # (R, n, k)
    # stage 2: the best chunk's k-th value bounds the row's k-th value from below -> one gather, no histograms
    return radix_topk_triton(v1.view(R, -1), k, idx_in=i1.view(R, -1), cap=cap, gmax=thr, group=k, gmax_is_max=True)


def indexer_topk_triton(qI, kI, w, k: int, ratio: int, q_offset: int = 0, return_scores: bool = False,
                        method: str = "auto", chunk_elems: int = 1 << 28, split: int | None = None,
                        workspace: torch.Tensor | None = None, radix_cap: int | None = None):
    """Lightning-indexer top-k. method (docs/kernels.md §3; measured by benchmarks/bench_csa.py):
      radix        Triton scores per query chunk (only the chunk's visible key range) + Triton radix-select top-k;
                   rows longer than max(split, 4k) are split into `split`-column chunks (default 8192 at decode,
                   65536 in prefill): per-chunk top-k over many programs, then the top-k of the candidates.
                   Ties: lower index first (exact twin).
      radix_gmax   radix whose score kernel also writes the max of every `group` entries (group ~ S'/(2k)); the
                   k-th largest group max bounds the k-th score from below, so one gather pass finds the candidates
                   and the histogram passes over the row are skipped (falls back to them when > cap candidates).
      gmax         Triton fp32 scores + group maxima per query chunk, then gmax_select.py: the k-th largest group
                   max bounds the k-th score from below, one compare-and-compact pass gathers the ~1.4k entries
                   above it, a sort of those gives the picks (sorted; ties: lower index, exact twin). Prefill.
      gmax_bf16    gmax on bf16 scores (group maxima stay fp32 and are rounded when compared).
      select       Triton fp32 scores per query chunk + the split-row radix select (select.py: each row over many
                   programs at decode, one per row in prefill; 8-bit digits, one launch per digit + one to emit).
                   Same values as torch.topk; which of several entries tied at the k-th value is taken varies.
      select_bf16  select on bf16 scores (the fp32 sum over heads rounded once, docs §2.4 precision note): half the
                   score bytes, two digit launches instead of four. Picks = the top-k of the bf16-rounded scores.
      torch_bf16   Triton bf16 scores + torch.topk of the bf16 rows.
      torch        Triton scores per query chunk + torch.topk (decode: torch.topk of the whole row); without
                   return_scores the picks come in torch.topk(sorted=False) order (same set).
      split_torch  Triton scores + two-stage torch.topk (per `split` chunk, then of the candidates).
      stream       the fused streaming kernel (scores never leave registers; bitonic merge per key tile).
      auto         AUTO["decode"] if T <= DECODE_T else AUTO["prefill"] (fp32 inputs: the fp32-score twin).
    torch.topk's order among equal scores is unspecified, so `torch`/`split_torch` may order ties (and pick among
    ties at the k-th value) differently from the naive twin, as may `select*`; `radix` and `stream` follow the
    lower-index rule. Without return_scores the `select*` and `torch*` picks come unsorted (same set); with it they
    are sorted by score.
    Query chunks hold at most `chunk_elems` fp32 scores (1 GiB by default); the [T, S] matrix is never built.
    workspace: an fp32 buffer for the score chunks (allocated per call if None or too small).
    radix_cap: candidate scratch slots of the radix kernel (radix_topk_triton's cap; 0 = no candidate shortcut)."""
    B, T, HI, DI = qI.shape
    S = kI.shape[1]
    decode = T <= DECODE_T
    if method == "auto":
        method = AUTO["decode" if decode else "prefill"]
        if qI.dtype == torch.float32:                               # fp32 model: keep fp32 scores (exact twin)
            method = FP32_TWIN.get(method, method)
    if method not in METHODS:
        raise ValueError(f"indexer_topk_triton: method={method!r}; allowed: auto, {', '.join(METHODS)}")
    if method == "stream":
        return _indexer_topk_stream(qI, kI, w, k, ratio, q_offset, return_scores)
    check_device(qI, kI, w)
    Smax = _visible(ratio, q_offset, T, S)
    rows = _row_budget(Smax, T, chunk_elems // max(B, 1))
    # select in one query chunk with >= k visible entries fills every slot itself: no -1 prefill, no copy (decode)
    own = ("select", "select_bf16", "gmax", "gmax_bf16")                # Triton selects that write into idx
    direct = method in own and rows >= T and Smax >= k > 0 and not (return_scores and method.startswith("select"))
    if direct:
        idx = torch.empty((B, T, k), dtype=torch.int32, device=qI.device)
        val = torch.empty((B, T, k), dtype=torch.float32, device=qI.device)
    else:
        idx = torch.full((B, T, k), -1, dtype=torch.int32, device=qI.device)
        val = torch.full((B, T, k), float("-inf"), dtype=torch.float32, device=qI.device)
    split = (8192 if decode else 65536) if split is None else split      # prefill: only rows > 64K are split
    if T > 0 and k > 0:
        radix = method in own + ("radix", "radix_gmax")     # read each row up to its own causal frontier
        pad = 64 if radix else 1                                # aligned rows: vector loads
        need = B * rows * -(-max(Smax, 1) // pad) * pad
        group = 0
        if method in ("radix_gmax", "gmax", "gmax_bf16"):
            from .gmax_select import gmax_group, gmax_select
            group = gmax_group(Smax, k)
            gbuf = torch.empty(B * rows * -(-max(Smax, 1) // group), dtype=torch.float32, device=qI.device)
        buf = workspace if workspace is not None and workspace.numel() >= need else \
            torch.empty(need, dtype=torch.float32, device=qI.device)
        sdt = torch.bfloat16 if method.endswith("_bf16") else torch.float32
        if method.startswith("select"):
            from .select import radix_select, workspace_size
            sel_ws = torch.empty(workspace_size(B * rows), dtype=torch.int32, device=qI.device)
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            Sp = _visible(ratio, q_offset, t1, S)
            if Sp == 0:
                continue                                        # nothing visible: the -1 / -inf prefill stands
            sc = indexer_scores_triton(qI, kI, w, ratio, q_offset, t0, t1, out=buf, fill=not radix,
                                       gmax=gbuf if group else None, group=group, dtype=sdt, pad=pad)
            sc = sc.view(B * (t1 - t0), Sp)                     # rows may be padded: stride(0) >= Sp
            gm = gbuf[: B * (t1 - t0) * -(-Sp // group)].view(B * (t1 - t0), -1) if group else None
            if method.startswith("gmax"):                       # sorted picks
                v, i = gmax_select(sc, gm, group, min(k, Sp), frontier=(t1 - t0, q_offset + t0, ratio),
                                   out=(val.view(B * T, k), idx.view(B * T, k)) if direct else None)
                if direct:
                    continue
            elif method.startswith("select"):
                v, i = radix_select(sc, min(k, Sp), frontier=(t1 - t0, q_offset + t0, ratio), workspace=sel_ws,
                                    out=(val.view(B * T, k), idx.view(B * T, k)) if direct else None)
                if direct:
                    continue
                if return_scores:
                    v, o = torch.sort(v, dim=-1, descending=True)
                    i = torch.gather(i, 1, o)
            elif radix:
                v, i = _topk_radix(sc, k, split, (t1 - t0, q_offset + t0, ratio), radix_cap, gm, group)
            elif method in ("torch", "torch_bf16"):             # picks in score order only when scores are returned
                v, i = _topk_torch(sc, k, ordered=return_scores)
                v = v.float()
            else:
                v, i = _topk_split_torch(sc, k, split)
            kk = v.shape[-1]
            idx[:, t0:t1, :kk] = i.view(B, t1 - t0, kk)
            val[:, t0:t1, :kk] = v.view(B, t1 - t0, kk)
    return (idx, val) if return_scores else idx
