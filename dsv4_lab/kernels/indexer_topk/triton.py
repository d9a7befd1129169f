"""Lightning-indexer scores + top-k in Triton (docs §2.4; same interface as naive.py; forward only). Entry point:
indexer_topk_triton(..., method=) (its docstring lists the methods; AUTO picks one for prefill and for decode).

  indexer_scores_triton  score kernel: (query chunk x visible key range) fp32 or bf16 scores, causal tile skipping
  select.radix_select    split-row radix select of the score rows (methods select / select_bf16)
  rowselect.row_select   one-program-per-row select of rows up to 32K entries (methods rowsel / rowsel_bf16)
  sieve.sieve_select     one-program-per-row select through a guessed threshold (methods sieve / sieve_bf16)
  torch.topk             of the score rows (methods torch / torch_bf16)

The variants measured against these on the H200 and removed (a fused streaming score + top-k kernel, one- and
two-stage radix selects with and without a group-max prefilter, a two-stage torch.topk, a group-max threshold
select) and their numbers: benchmarks/README.md, "Removed indexer top-k variants".
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, autotune, check_device, configs, dot_dtype, jit, next_pow2, tl, triton
from .naive import MXFP4Keys, check_mxfp4_keys, key_tensors
from .select import _hist_body, digit_levels


# ================================================================================================ score kernel
# I[t, s] = sum_h w[t, h] ReLU(qI[t, h] . kI[s]) for one query chunk [t0, t1) over the chunk's visible key range
# [0, S'), S' = floor((q_offset + t1) / ratio) clipped to S. One program: BLOCK_M queries x all HI heads (BLOCK_M * HIP
# q rows of one tl.dot, bf16 operands on the GPU, fp32 accumulate) against BLOCK_N keys; ReLU * w * sum over heads in
# registers (prefill tiles: the keys as the dot's rows, so that each thread holds every head of its queries and the
# sum needs no shuffles; docs/kernels.md §3). Key tiles entirely beyond the query tile's causal frontier are not
# computed, only filled with -inf.
# The grid is (key ranges, query tiles, B) with the key ranges fastest, so at decode (one query) the S keys are spread
# over all SMs (docs/kernels.md §8.4: the key stream is the cost). A program walks NLOOP key tiles of BLOCK_N: its
# queries' q rows and weights are loaded once, and the key tiles' loads feed the dot inside a loop, which Triton
# software-pipelines (NLOOP 1: one tile per program, the query tile reloaded from L2 for every key tile).
def _score_configs():
    # 256-key tiles: at decode (one query, BLOCK_M 4) half the programs of 128-key tiles for the same key stream.
    # Programs of 8 key tiles for prefill, where a query tile meets up to S / BLOCK_N of them: the query tile and
    # weights are loaded once per program and Triton pipelines the key loads (fastest on the H200 at 8K and 128K:
    # benchmarks/README.md, T2). The interpreter's config walks 2 key tiles per program, so the CPU tests run the loop.
    gpu = [triton.Config({"BLOCK_N": bn, "NLOOP": nl}, num_warps=nw, num_stages=ns)
           for bn, nl, nw, ns in ((64, 1, 4, 2), (128, 1, 8, 2), (128, 1, 8, 3), (256, 1, 8, 2), (64, 8, 4, 3),
                                  (128, 8, 8, 3))]
    return configs(gpu, triton.Config({"BLOCK_N": 16, "NLOOP": 2}, num_warps=4, num_stages=1))


# Not in the autotune list until timed and checked on the GPU (bench_csa.py `score_configs` times each one explicitly
# (config=...); tests/test_kernels_gpu.py checks each). None waiting: (128 keys, 4 tiles, 8 warps) and (128, 8, 4
# warps) measured slower than (64, 8, 4 warps) at 8K and 128K and left.
SCORE_CANDIDATE_CONFIGS = []


@jit
def _e2m1_bf16(code):
    """4-bit E2M1 codes (int32) -> their values as bf16, built from bits with integer ops (no int -> float
    conversions, the cost of unpacking): e = bits 1-2 and m = bit 0 of the magnitude t = code & 7 give 2^(e - 1)
    (1 + m / 2) for e > 0 (bf16 exponent e + 126, mantissa bit m), 0.5 for t = 1, 0 for t = 0; bit 3 is the sign
    (code 8: -0.0). naive.py mxfp4_key_values is the same table."""
    t = code & 7
    bits = tl.where(t > 1, (t << 6) + (126 << 7), tl.where(t == 1, 126 << 7, 0)) | ((code & 8) << 12)
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@jit
def _mxfp4_logits(Q, q_rows, rmask, KI, KS, row_c, row_s, kmask, NKB: tl.constexpr, R: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_DT: tl.constexpr):
    """(R, BLOCK_N) fp32 q . k against packed keys: q rows at Q + q_rows (R,), key rows' codes at KI + row_c (DI / 2
    bytes, the low nibble the even element) and E8M0 scales at KS + row_s (one byte per 32 elements). Per 32-element
    block: its 16 code bytes (one vector load per key), the E2M1 values of the low and high nibbles against the even
    and odd elements of q (two K = 16 dots, no interleaving), times the block's scale 2^(byte - 127) into the fp32
    accumulator. The same products as q . (unpacked key), summed in another grouping (docs/kernels.md §8.4)."""
    j = tl.arange(0, 16)
    acc = tl.zeros([R, BLOCK_N], tl.float32)
    for blk in tl.static_range(NKB):
        byte = tl.load(KI + row_c[:, None] + blk * 16 + j[None, :], mask=kmask[:, None], other=0).to(tl.int32)
        sbyte = tl.load(KS + row_s + blk, mask=kmask, other=0).to(tl.int32)
        scale = (sbyte << 23).to(tl.float32, bitcast=True)                      # (BLOCK_N,) 2^(byte - 127)
        qe = tl.load(Q + q_rows[:, None] + blk * 32 + 2 * j[None, :], mask=rmask[:, None], other=0.0)
        qo = tl.load(Q + q_rows[:, None] + blk * 32 + 2 * j[None, :] + 1, mask=rmask[:, None], other=0.0)
        part = tl.dot(qe.to(DOT_DT), tl.trans(_e2m1_bf16(byte & 15).to(DOT_DT)))
        part = tl.dot(qo.to(DOT_DT), tl.trans(_e2m1_bf16(byte >> 4).to(DOT_DT)), acc=part)
        acc += part * scale[None, :]
    return acc


@jit
def _tile_rows(R: tl.constexpr, HIP: tl.constexpr, KROWS: tl.constexpr):
    """(query, head) of each of the R = BLOCK_M * HIP q rows of a tile. Heads minor (r = m HIP + h), or for KROWS
    r = (m / 8) 8 HIP + h 8 + m % 8: in the MMA accumulator a thread's columns are c, c + 1, c + 8, c + 9, ..., so
    with the heads 8 columns apart every head of a query lies in the same thread (BLOCK_M a multiple of 8)."""
    r = tl.arange(0, R)
    if KROWS:
        return (r // (8 * HIP)) * 8 + r % 8, (r // 8) % HIP
    else:
        return r // HIP, r % HIP


@jit
def _tile_weights(W, t, nq, swt, HI: tl.constexpr, HIP: tl.constexpr, BLOCK_M: tl.constexpr, KROWS: tl.constexpr,
                  live):
    """The weights of queries t .. t + BLOCK_M (nq of them live) in _tile_rows order, (R,) fp32: loaded as a
    (BLOCK_M, HIP) tile (each query's heads contiguous), then reordered in registers (not one pointer per row)."""
    m = tl.arange(0, BLOCK_M)
    h = tl.arange(0, HIP)
    w = tl.load(W + (t + m).to(tl.int64)[:, None] * swt + h[None, :],
                mask=(m < nq)[:, None] & (h < HI)[None, :] & live, other=0.0).to(tl.float32)
    if KROWS:
        w = tl.permute(tl.reshape(w, [BLOCK_M // 8, 8, HIP]), [0, 2, 1])
    return tl.reshape(w, [BLOCK_M * HIP])


@jit
def _score_tile(Q, K, KSC, O, q, qrow, rmask, wr, n0, sks, sss, nvis_m, nvis_last, omask_m, Sp, offs_d, dmask,
                HIP: tl.constexpr, DI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
                DOT_DT: tl.constexpr, MXFP4: tl.constexpr, KROWS: tl.constexpr):
    """Scores of the query tile (q: its (R, DI) rows in _tile_rows order; weights wr) against the keys n0 ..
    n0 + BLOCK_N, stored at O's rows (omask_m: the tile's live queries): ReLU(q k) w summed over heads, -inf past each
    query's frontier nvis_m. KROWS: the keys are the dot's rows and the query x head pairs its columns, so that each
    thread's accumulator holds all HIP heads of its queries and the sum over heads needs no shuffle (_tile_rows)."""
    s = n0 + tl.arange(0, BLOCK_N)
    if MXFP4:                                      # packed keys (K codes, KSC scales): a quarter of the bytes
        logit = _mxfp4_logits(Q, qrow, rmask, K, KSC, s.to(tl.int64) * sks, s.to(tl.int64) * sss, s < nvis_last,
                              DI // 32, R, BLOCK_N, DOT_DT)
    else:
        kt = tl.load(K + s.to(tl.int64)[:, None] * sks + offs_d[None, :],
                     mask=(s < nvis_last)[:, None] & dmask[None, :], other=0.0)
        if KROWS:
            logit = tl.dot(kt.to(DOT_DT), tl.trans(q))                         # (BLOCK_N, R) fp32
        else:
            logit = tl.dot(q, tl.trans(kt.to(DOT_DT)))                         # (R, BLOCK_N) fp32
    if KROWS:
        logit = tl.maximum(logit, 0.0) * wr[None, :]
        sc = tl.sum(tl.reshape(logit, [BLOCK_N, BLOCK_M // 8, HIP, 8]), 2)     # (BLOCK_N, BLOCK_M / 8, 8)
        sc = tl.trans(tl.reshape(sc, [BLOCK_N, BLOCK_M]))                       # (BLOCK_M, BLOCK_N)
    else:
        logit = tl.maximum(logit, 0.0) * wr[:, None]
        sc = tl.sum(tl.reshape(logit, [BLOCK_M, HIP, BLOCK_N]), 1)              # (BLOCK_M, BLOCK_N)
    sc = tl.where(s[None, :] < nvis_m[:, None], sc, float("-inf"))
    tl.store(O + s[None, :], sc.to(O.dtype.element_ty), mask=omask_m & (s < Sp)[None, :])   # fp32, or bf16


@jit
def _fill_tile(O, n0, omask_m, Sp, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """-inf in a tile of keys no query of the tile sees."""
    s = n0 + tl.arange(0, BLOCK_N)
    tl.store(O + s[None, :], tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32).to(O.dtype.element_ty),
             mask=omask_m & (s < Sp)[None, :])


@autotune(configs=_score_configs(), key=["HIP", "DI", "BLOCK_M", "RATIO", "MXFP4"])
@jit
def _indexer_scores_fwd(QI, KI, KS, WT, OUT, HIST, PH, Tq, Sp, t0, q_offset, NPROG, KSEL,
                        sqb, sqt, sqh, skb, sks, ssb, sss, swb, swt, sob, sot,
                        HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NLOOP: tl.constexpr, RATIO: tl.constexpr,
                        DOT_DT: tl.constexpr, FILL: tl.constexpr, MXFP4: tl.constexpr, L0DB: tl.constexpr,
                        L0NL: tl.constexpr):
    """L0DB > 0 (level0 of indexer_scores_triton; one query per program, BLOCK_M 1, T = 1): the program's
    NLOOP * BLOCK_N keys are also chunk pid_n of radix_select's row b (NPROG programs, k = KSEL, L0NL digits of L0DB
    bits); after writing their scores it runs that select's level-0 program on them (select._hist_body: read back,
    as stored, after a CTA barrier), adding the chunk's first-digit histogram to HIST and its suffix counts to PH."""
    R: tl.constexpr = BLOCK_M * HIP
    KROWS: tl.constexpr = (BLOCK_M % 8 == 0) and (not MXFP4)                  # keys as the dot's rows (_score_tile)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m0 = pid_m * BLOCK_M
    n_first = pid_n * NLOOP * BLOCK_N                                          # this program's first key
    im = m0 + tl.arange(0, BLOCK_M)                                            # chunk-local query rows
    nvis_m = tl.minimum((q_offset + t0 + im + 1) // RATIO, Sp)                  # (BLOCK_M,) visible per query
    nvis_last = tl.minimum((q_offset + t0 + tl.minimum(m0 + BLOCK_M, Tq)) // RATIO, Sp)
    # key tiles of this program with a key visible to some query of the tile (the rest: -inf or left unwritten)
    nt = tl.maximum(tl.minimum((nvis_last - n_first + BLOCK_N - 1) // BLOCK_N, NLOOP), 0)
    mr, hr = _tile_rows(R, HIP, KROWS)                                        # (R,) query, head of each q row
    tr = t0 + m0 + mr
    rmask = (m0 + mr < Tq) & (hr < HI) & (nt > 0)                              # nothing loaded without a tile
    qrow = tr.to(tl.int64) * sqt + hr * sqh
    wr = _tile_weights(WT + b * swb, t0 + m0, Tq - m0, swt, HI, HIP, BLOCK_M, KROWS, nt > 0)   # (R,) fp32
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < DI
    if not MXFP4:                                  # the query tile once, for every key tile below
        q = tl.load(QI + b * sqb + qrow[:, None] + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(DOT_DT)
    else:
        q = wr                                     # unused: the packed path loads q per 32-element block
    omask_m = (im < Tq)[:, None]
    orow = b * sob + im.to(tl.int64)[:, None] * sot
    if NLOOP == 1:                                 # one tile, straight-line code (no pipeline buffers to fill)
        if nt > 0:
            _score_tile(QI + b * sqb, KI + b * skb, KS + b * ssb, OUT + orow, q, qrow, rmask, wr, n_first, sks, sss,
                        nvis_m, nvis_last, omask_m, Sp, offs_d, dmask, HIP, DI, BLOCK_M, BLOCK_N, R, DOT_DT, MXFP4,
                        KROWS)
        elif FILL:                                 # FILL=False: the reader stops at each row's frontier (select)
            _fill_tile(OUT + orow, n_first, omask_m, Sp, BLOCK_M, BLOCK_N)
    else:
        for j in range(0, nt):
            _score_tile(QI + b * sqb, KI + b * skb, KS + b * ssb, OUT + orow, q, qrow, rmask, wr, n_first + j * BLOCK_N,
                        sks, sss, nvis_m, nvis_last, omask_m, Sp, offs_d, dmask, HIP, DI, BLOCK_M, BLOCK_N, R, DOT_DT,
                        MXFP4, KROWS)
        if FILL:
            for j in range(nt, NLOOP):
                _fill_tile(OUT + orow, n_first + j * BLOCK_N, omask_m, Sp, BLOCK_M, BLOCK_N)
    if L0DB > 0:                                   # the select's level-0 program for this chunk, on the stored scores
        tl.static_assert(BLOCK_M == 1, "one query row per program")
        tl.debug_barrier()                         # every thread's score stores before any thread reads them back
        _hist_body(OUT, HIST, PH, Sp, NLOOP * BLOCK_N, NPROG, sob, 1, q_offset + t0, KSEL, 0, pid_n,
                   tl.program_id(2), L0NL, L0DB, RATIO, NLOOP * BLOCK_N, 0)   # row b: the select's row of batch b


def _visible(ratio: int, q_offset: int, t1: int, S: int) -> int:
    return max(0, min(S, (q_offset + t1) // ratio))


def indexer_scores_triton(qI, kI, w, ratio: int, q_offset: int = 0, t0: int = 0, t1: int | None = None,
                          s1: int | None = None, out: torch.Tensor | None = None, fill: bool = True, config=None,
                          dtype: torch.dtype = torch.float32, pad: int = 1, level0=None):
    """(B, t1 - t0, S') scores of queries t0..t1-1 (positions q_offset + t), invisible entries -inf; `dtype` fp32,
    or bf16 (the fp32 sum over heads rounded once to nearest: half the bytes written and read by the top-k).

    S' = s1 if given, else the chunk's visible range floor((q_offset + t1) / ratio) (clipped to S): the keys beyond it
    are invisible to every query of the chunk and are neither read nor written. `out` may be a preallocated buffer
    of at least that size (reused across chunks). fill=False leaves the key tiles that lie wholly beyond a query
    tile's causal frontier unwritten (for readers that stop at each row's frontier, as radix_select does).
    config: one triton.Config of the autotune list to run instead of the tuned choice (tests of every config).
    pad: rows of `out` start every ceil(S' / pad) * pad elements (pad 64: aligned rows, so readers load whole
    16-byte vectors); the result is then a (B, t1 - t0, S') view of the padded rows.
    kI: (B, S, DI) keys, or naive.MXFP4Keys (packed MXFP4: a quarter of the bf16 key bytes, unpacked in registers:
    the scores of the unpacked keys up to fp32 summation order, _mxfp4_logits summing per 32-element block).
    level0=(workspace, k): one query per batch row (t1 - t0 == 1, decode) and the first digit launch of the radix
    select that follows, fused: each program scores level0_chunk(S') keys, radix_select's chunk, then runs that
    launch's program for the chunk on the stored scores (select._hist_body, into the select.SelectWorkspace); then
    radix_select(..., programs=cdiv(S', chunk), block=chunk, digit_bits=8, first_level=1, workspace=) runs the rest
    (the same picks, bit for bit). fill=False; config is not used (one launch form, LEVEL0_CONFIG)."""
    packed = isinstance(kI, MXFP4Keys)
    if packed:
        check_mxfp4_keys(kI)
    check_device(qI, *key_tensors(kI), w)
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
    keys, scales = (kI.codes, kI.scales) if packed else (kI, kI)          # scales: unused unless packed
    keys, scales = (t if t.stride(-1) == 1 else t.contiguous() for t in (keys, scales))
    w = w if w.stride(-1) == 1 else w.contiguous()
    HIP = next_pow2(HI)
    # rows of the dot = BLOCK_M * HIP: >= 16 (min dot size); 128 for prefill tiles, 16 when decoding a few queries
    # (interpreter: 32 for prefill, so tiny tests have several query tiles and exercise the causal tile skipping, and
    # a multiple of 8 queries at HIP <= 4: the KROWS tile, _score_tile)
    BLOCK_M = max(1, (16 if Tq <= 16 else 32 if INTERPRET else 128) // HIP)
    grid = lambda META: (triton.cdiv(Sp, META["BLOCK_N"] * META["NLOOP"]), triton.cdiv(Tq, BLOCK_M), B)  # noqa: E731
    kern, extra = _indexer_scores_fwd, {}
    if config is not None:
        kern, extra = _indexer_scores_fwd.fn, dict(config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
    hist, ph, nprog, ksel, nl, l0db = out, out, 1, 0, 0, 0                       # level 0 off (pointers unused)
    if level0 is not None:
        ws, ksel = level0
        if Tq != 1:
            raise ValueError(f"indexer_scores_triton: level0 with t1 - t0 = {Tq} query rows; allowed: 1 (decode)")
        chunk, bn = level0_chunk(Sp), LEVEL0_CONFIG["BLOCK_N"]                # chunk: whole tiles
        nprog, l0db = triton.cdiv(Sp, chunk), LEVEL0_DB
        nl = 2 if _tail_rows(dtype) else digit_levels(dtype, l0db)      # the select's digits (tail: 2 of fp32)
        ws.fit_select(B, nprog, nl, l0db, qI.device)
        hist, ph, fill, BLOCK_M, HIP = ws.hist, ws.scratch, False, 1, max(16, HIP)   # 16 dot rows: heads padded
        kern, extra = _indexer_scores_fwd.fn, dict(BLOCK_N=bn, NLOOP=chunk // bn,
                                                   num_warps=LEVEL0_CONFIG["num_warps"],
                                                   num_stages=LEVEL0_CONFIG["num_stages"])
        grid = (nprog, 1, B)
    kern[grid](qI, keys, scales, w, out, hist, ph, Tq, Sp, t0, q_offset, nprog, ksel,
               *qI.stride()[:3], *keys.stride()[:2], *scales.stride()[:2], *w.stride()[:2],
               *out.stride()[:2],                                           # one stride() call per tensor
               HI=HI, HIP=HIP, DI=DI, BLOCK_D=max(16, next_pow2(DI)), BLOCK_M=BLOCK_M, RATIO=ratio,
               DOT_DT=dot_dtype(qI), FILL=fill, MXFP4=packed, L0DB=l0db, L0NL=nl, **extra)
    return out


# The decode score launch with the select's first digit fused (level0 above): about `programs` programs per row
# (radix_select's decode split, select.default_programs), BLOCK_N keys per tile, num_warps / num_stages of the
# program's key loop; LEVEL0_DB-bit digits (radix_select's decode digits). Used where FUSE_LEVEL0 (below) is on;
# bench_csa.py decode also times other values of this dict (none faster on the H200: benchmarks/README.md T6).
LEVEL0_CONFIG = {"programs": 4 if INTERPRET else 128, "BLOCK_N": 16 if INTERPRET else 256, "num_warps": 8,
                 "num_stages": 3}
LEVEL0_DB = 8


def level0_chunk(Sp: int) -> int:
    """Keys per program of the fused level-0 score launch, = radix_select's chunk there (a power of two): about
    LEVEL0_CONFIG["programs"] programs per row, between one tile and 2048 keys (4 tiles in the interpreter, so tiny
    tests split their rows)."""
    c = LEVEL0_CONFIG
    hi = 4 * c["BLOCK_N"] if INTERPRET else 2048
    return min(hi, max(c["BLOCK_N"], next_pow2(triton.cdiv(max(Sp, 1), c["programs"]))))


# ================================================================================================ indexer + top-k
METHODS = ("torch", "torch_bf16", "select", "select_bf16", "rowsel", "rowsel_bf16", "sieve", "sieve_bf16")
# Which method "auto" takes (docs/kernels.md §3 gives the measurements, benchmarks/README.md T2 / T5 / T6 the runs;
# the methods that lost left the package):
# - prefill: `sieve` (sieve.py: one program per row, a guessed threshold, ~2k candidates selected in registers), the
#   same picks as `select`, slot for slot, and faster than `torch.topk` of the same scores at 8K-128K;
# - prefill query chunks whose visible key range is at most AUTO_SHORT_L entries: `rowsel` (rowselect.py: one program
#   holds the whole row in registers), which wins on short rows and spills on long ones; None = never;
# - decode (T <= DECODE_T): `select`, the split-row radix select (select.py), faster than `torch.topk` on a long row.
# "auto" never takes a bf16-score method for fp32 inputs: it takes its fp32-score twin (select, sieve) instead.
AUTO = {"prefill": "sieve", "decode": "select"}
AUTO_SHORT_L: int | None = 2048
FP32_TWIN = {"select_bf16": "select", "torch_bf16": "torch", "rowsel_bf16": "rowsel", "sieve_bf16": "sieve"}
BF16_TWIN = {v: k for k, v in FP32_TWIN.items()}
DECODE_T = 16                                        # T <= DECODE_T queries: the decode method
# Decode with one query (T = 1) under the select methods: the score launch also counts the select's first digit
# (indexer_scores_triton level0), one launch fewer per step, the same picks; faster on the H200 (bench_csa.py decode:
# indexer_select*_fused_us against indexer_select*_us; docs/kernels.md §3).
FUSE_LEVEL0 = True
# fp32 score rows of the select methods through tailselect.tail_select: two digit launches over the top 16 key bits
# and an emit whose last program settles the rest (three launches instead of radix_select's five; the same picks,
# slot for slot; docs/kernels.md §3). Faster than radix_select on the H200's 256K row (bench_csa.py topk_row:
# select_tail_fp32_us against select_fp32_us).
FP32_TAIL = True


def _tail_rows(dtype: torch.dtype) -> bool:
    """Whether score rows of this dtype go through the tail select: FP32_TAIL, fp32 rows, and the level-0 digit of
    the tail's width (8 bits), so that the score launch's table and the selector agree."""
    return FP32_TAIL and dtype == torch.float32 and LEVEL0_DB == 8


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


_SELECT_WS: dict = {}        # device -> the select.SelectWorkspace of the calls on that device (one stream at a time)


def _select_workspace(rows: int, device):
    """The select.SelectWorkspace of the calls on `device`: one per device, kept (each call leaves it zeroed: no
    memset launch); it grows by fit, keeping the old buffers."""
    from .select import SelectWorkspace
    if str(device) not in _SELECT_WS:
        _SELECT_WS[str(device)] = SelectWorkspace(rows, device=device)
    return _SELECT_WS[str(device)]


def _level0_selector(ws, Sp: int):
    """The select after digit 0 on the rows of a level0 score launch (indexer_scores_triton): its chunks and
    workspace, f(scores (R, Sp), k, frontier, out) -> (vals, idx) as _row_selector's."""
    from .select import radix_select
    from .tailselect import tail_select
    chunk = level0_chunk(Sp)

    def run(sc, kk, fr, out):
        select, extra = (tail_select, {}) if _tail_rows(sc.dtype) else (radix_select, {"digit_bits": LEVEL0_DB})
        return select(sc, kk, frontier=fr, programs=triton.cdiv(Sp, chunk), block=chunk, workspace=ws, out=out,
                      first_level=1, **extra)
    return run


def _row_selector(method: str, rows: int, device):
    """The select methods' top-k of score rows, f(scores (R, L), k, frontier, out) -> (vals, idx) for up to `rows`
    rows at a time (select.py / sieve.py / rowselect.py); None for the torch.topk methods."""
    if method.startswith("select"):
        from .select import radix_select
        from .tailselect import tail_select
        ws = _select_workspace(rows, device)
        return lambda sc, kk, fr, out: (tail_select if _tail_rows(sc.dtype) else radix_select)(
            sc, kk, frontier=fr, workspace=ws, out=out)
    if method.startswith("sieve"):
        from .sieve import sieve_select
        return lambda sc, kk, fr, out: sieve_select(sc, kk, frontier=fr, out=out)
    if method.startswith("rowsel"):
        from .rowselect import row_select
        return lambda sc, kk, fr, out: row_select(sc, kk, frontier=fr, out=out)
    return None


def indexer_topk_triton(qI, kI, w, k: int, ratio: int, q_offset: int = 0, return_scores: bool = False,
                        method: str = "auto", chunk_elems: int = 1 << 28, workspace: torch.Tensor | None = None,
                        fuse_level0: bool | None = None):
    """Lightning-indexer top-k. method (docs/kernels.md §3; measured by benchmarks/bench_csa.py):
      torch        Triton fp32 scores per query chunk (only the chunk's visible key range) + torch.topk of the rows.
                   The reference bench_csa.py checks the other methods against.
      torch_bf16   torch on bf16 scores (the fp32 sum over heads rounded once, docs §2.4 precision note).
      select       Triton fp32 scores per query chunk + the split-row radix select (select.py: each row over many
                   programs at decode, one per row in prefill; one launch per digit + one to emit; each row read
                   only up to its own causal frontier). The decode default; same values as torch.topk, ties to
                   the lower index, deterministic.
      select_bf16  select on bf16 scores: half the score bytes, half the digit launches. Picks = the top-k of the
                   bf16-rounded scores.
      rowsel       Triton fp32 scores per query chunk + the row select (rowselect.py: one program per row, the row
                   in registers, the threshold by bisection on the key bits, one launch); rows longer than
                   rowselect.MAX_L entries go to select. Output identical to select's, slot for slot.
      rowsel_bf16  rowsel on bf16 scores (16 bisection steps instead of 32).
      sieve        Triton fp32 scores per query chunk + the sieve select (sieve.py: one program per row; a threshold
                   guessed from ~1K sampled entries lets ~2k candidates through to a row select in registers, with
                   an exact streamed fallback; one launch). The prefill default (faster than torch.topk on the
                   H200 at 8K-128K). Output identical to select's, slot for slot. Few long rows (decode): still
                   one program per row, which streams it alone (slow: decode takes select).
      sieve_bf16   sieve on bf16 scores.
      auto         AUTO["decode"] if T <= DECODE_T else AUTO["prefill"] (fp32 inputs: the fp32-score twin); in
                   prefill, rowsel for the query chunks that see at most AUTO_SHORT_L entries.
      auto_bf16    auto's choice on bf16 scores (its _bf16 twin, whatever the inputs' dtype; short chunks rowsel_bf16):
                   the model's index_score_dtype="bf16".
    Ties: the fp32-score methods return the values of the naive twin's picks (the same multiset; the bf16 ones, those
    of the bf16-rounded scores). select also keeps the naive twin's tie rule (of several entries tied at the k-th
    value, the lower indices) and is deterministic, so on the same scores its picks are the naive twin's set;
    torch.topk leaves the choice among ties and the order of equal scores unspecified.
    Without return_scores the picks come unsorted: torch.topk(sorted=False) order, or select's slot order (the picks
    above the k-th value in index order, then the tied ones in index order; a row with fewer than k visible entries
    in index order, -1 after); every consumer masks -1 slots per slot. With return_scores they are sorted by score,
    -1 / -inf last (select: stable, so equal scores stay in index order, as in the naive twin).
    Query chunks hold at most `chunk_elems` scores (1 GiB of fp32 by default); the [T, S] matrix is never built.
    kI may be naive.MXFP4Keys (packed MXFP4 keys, as the paper caches them: the score kernel unpacks them).
    workspace: an fp32 buffer for the score chunks (allocated per call if None or too small).
    fuse_level0 (None: FUSE_LEVEL0): with a select method and one query (T = 1), the score launch also counts the
    select's first digit (indexer_scores_triton level0): one launch fewer, the same picks."""
    from .rowselect import MAX_L                                    # read per call (the tests lower it)
    B, T, HI, DI = qI.shape
    S = kI.shape[1]
    short_l = 0                                                     # chunks seeing <= short_l entries: rowsel
    if method in ("auto", "auto_bf16"):
        bf16 = method == "auto_bf16"
        method = AUTO["decode" if T <= DECODE_T else "prefill"]
        if bf16:                                                    # scores rounded to bf16 (index_score_dtype)
            method = BF16_TWIN.get(method, method)
        elif qI.dtype == torch.float32:                             # fp32 model: keep fp32 scores (exact twin)
            method = FP32_TWIN.get(method, method)
        if T > DECODE_T and AUTO_SHORT_L and not method.startswith("rowsel"):
            short_l = min(AUTO_SHORT_L, MAX_L)
    if method not in METHODS:
        raise ValueError(f"indexer_topk_triton: method={method!r}; allowed: auto, {', '.join(METHODS)}")
    check_device(qI, *key_tensors(kI), w)
    Smax = _visible(ratio, q_offset, T, S)
    rows = _row_budget(Smax, T, chunk_elems // max(B, 1))
    if method.startswith("rowsel") and Smax > MAX_L:                # a row does not fit one program: split it
        method = method.replace("rowsel", "select")
    select_rows = _row_selector(method, B * rows, qI.device)
    short_rows = _row_selector("rowsel", B * rows, qI.device) if short_l else None
    select = select_rows is not None
    # select in one query chunk with >= k visible entries fills every slot itself: no -1 prefill, no copy (decode)
    direct = (select or Smax <= short_l) and rows >= T and Smax >= k > 0 and not return_scores
    if direct:
        idx = torch.empty((B, T, k), dtype=torch.int32, device=qI.device)
        val = torch.empty((B, T, k), dtype=torch.float32, device=qI.device)
    else:
        idx = torch.full((B, T, k), -1, dtype=torch.int32, device=qI.device)
        val = torch.full((B, T, k), float("-inf"), dtype=torch.float32, device=qI.device)
    if T > 0 and k > 0:
        pad = 64 if select or short_l else 1        # select reads each row up to its frontier: aligned vector loads
        need = B * rows * -(-max(Smax, 1) // pad) * pad
        buf = workspace if workspace is not None and workspace.numel() >= need else \
            torch.empty(need, dtype=torch.float32, device=qI.device)
        sdt = torch.bfloat16 if method.endswith("_bf16") else torch.float32
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            Sp = _visible(ratio, q_offset, t1, S)
            if Sp == 0:
                continue                                        # nothing visible: the -1 / -inf prefill stands
            short = Sp <= short_l                               # a short chunk: the row select (auto)
            fused = method.startswith("select") and T == 1 and (FUSE_LEVEL0 if fuse_level0 is None else fuse_level0)
            level0 = (_select_workspace(B, qI.device), min(k, Sp)) if fused else None
            sc = indexer_scores_triton(qI, kI, w, ratio, q_offset, t0, t1, out=buf, fill=not (select or short),
                                       dtype=sdt, pad=pad, level0=level0)
            sc = sc.view(B * (t1 - t0), Sp)                     # rows may be padded: stride(0) >= Sp
            if select or short:
                rows_f = _level0_selector(level0[0], Sp) if fused else short_rows if short else select_rows
                v, i = rows_f(sc, min(k, Sp), (t1 - t0, q_offset + t0, ratio),
                              (val.view(B * T, k), idx.view(B * T, k)) if direct else None)
                if direct:
                    continue
                if return_scores:                               # stable: equal scores stay in index order
                    v, o = torch.sort(v, dim=-1, descending=True, stable=True)
                    i = torch.gather(i, 1, o)
            else:                                               # picks in score order only when scores are returned
                v, i = _topk_torch(sc, k, ordered=return_scores)
                v = v.float()
            kk = v.shape[-1]
            idx[:, t0:t1, :kk] = i.view(B, t1 - t0, kk)
            val[:, t0:t1, :kk] = v.view(B, t1 - t0, kk)
    return (idx, val) if return_scores else idx
