"""Fused mHC pre and post in Triton (same interface as naive.py; docs/kernels.md §4, T8; docs §1.2).

pre (persistent: CPS programs per SM, each walking blocks of BT tokens):
  pass 1  streams vec(x) of the BT tokens once, chunk by chunk (BC channels of one stream at a time, channel-chunk
          major so the last chunks read are the first re-read in pass 2), accumulating sum(x^2) and the
          (2 + n) n mixes as tl.dot([BT, BC] x [BC, 2H]) into a [BT, 2H] fp32 tile, H = NP^2, NP = max(4, pow2(n)).
          Column layout of that tile: [0, H) = res logits (i, j) at i NP + j, [H, 2H) = pre (row 0) / post (row 1).
  epilogue rho, the static/dynamic affine, sigmoid, and the whole Sinkhorn (iters row/column normalisations) on a
          [BT, NP, NP] register tile; coef (fp32, (2 + n) n per token) is written once.
  pass 2  re-reads the BT tokens' streams in reverse chunk order (L2-hot: the program's footprint is BT n d x 2 bytes)
          to form u = sum_i A_i x_i.
  mix="split" (PRE_MIX): pass 2 is left out and a second, elementwise launch (`_mhc_mix_kernel`, grid over tokens x
          channels like post) forms u from x and the coef. x is then read twice from HBM (18 d bytes per token instead
          of 10 d), but pass 1 runs free of the L2-footprint bound on the persistent grid (more programs per SM). On
          an H200 the fused pre reached 26 % of copy bandwidth (latency-bound pass 1, one 8-warp program per SM), which
          a two-read design at copy speed would beat; bench_mhc.py measures both and PRE_MIX follows the measurement.
  Projection precision ("fp32 compute", docs §1.2): one small launch splits fp32 W into bf16 hi + lo
  (W = hi + lo + O(2^-17 |W|), rows already in the accumulator's order); bf16 x is exact in bf16, so
  x W = x hi + x lo with two bf16 MMAs (fp32 accumulate), whose operands go straight to shared memory (pipelined):
  ~fp32 accuracy at the cost of one tf32 MMA, more accurate than the reference's single-pass tf32 GEMM. fp32 / fp16 x
  are split too (3 MMAs, the lo x lo term dropped). Under the interpreter the dot is plain fp32 (`dot="auto"`), or the
  split is emulated with fp32 dots of the bf16-rounded parts (`dot="bf16x3"`, to test the split arithmetic on CPU).
post (one program per BT tokens x BD channels): x'_j = C_j y + sum_i P_ij x_i, reading x and y once.

Bytes (bench_mhc.py, docs/kernels.md §4 cost model): pre reads n d x + writes d u (+ (2 + n) n fp32 coef); post reads
n d x + d y (+ coef) and writes n d x'; 28 d bytes per token and site for bf16 streams, plus the coef.

Backward (Triton; formulas above the backward kernels): the training forward also writes mu = rho v W^T and rho
(G n + 1 fp32 per token). post: one pass per token block (dy, dx, dC, dP; the channel reductions in registers). pre:
a persistent kernel re-derives the maps from mu, runs the Sinkhorn adjoint backwards from the final P with the
2 iters - 1 normalisation denominators parked in a per-program scratch, and writes dx = post's dx + A du + the projection / RMS terms in one more (L2-hot)
pass over x; dW = sum over tokens of (rho dmu)^T vec(x) by a split-K dot kernel with one fp32 atomic add per
program; dbase / dscale by per-block fp32 atomics (run-to-run bit differences in those three, not in dx).
MHCPreFn returns x itself as a third output (xa) for mhc_post: post's dx then arrives in the pre backward as xa's
gradient and is summed in the same pass (one extra read of n d instead of autograd's separate sum: two reads and
one write).
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, autotune, check_device, configs, jit, next_pow2, sm_count, tl, triton

SPLIT_FP32, SPLIT_W, SPLIT_XW = 0, 1, 2          # plain fp32 dot | bf16 x, W = hi + lo | x and W both split
PRE_MIX = "fused"                                # how mhc_pre forms u: "fused" | "split" (module docstring)


def _pre(bt, bc, cps, warps, stages=3, maxnreg=None):
    """A pre kernel config: BT tokens x BC channels per step, CPS programs per SM; maxnreg: a cap on registers per
    thread (ptxas), so that CPS programs fit on an SM at once."""
    return triton.Config({"BT": bt, "BC": bc, "CPS": cps}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def _pre_configs():
    # CPS = programs per SM of the persistent grid: it bounds the x bytes in flight between pass 1 and the L2-hot
    # pass 2 (132 SMs x CPS x BT x n d x 2 B; 34-67 MB at d = 1024 against the ~50 MB L2) while BC x stages sets the
    # bytes in flight per program.
    # Configs with 64 or more token rows per warpgroup raced on bf16 x before pass 1's fresh product tile (docs/
    # kernels.md §4); since then every one measured is bitwise repeatable and correct (benchmarks/README.md, T8).
    # (BT 128, BC 128, 8 warps) and then (BT 64, BC 128, CPS 2, 4 warps: two programs per SM, so that one streams x
    # while the other runs its Sinkhorn epilogue) joined from the candidates, each the fastest of its run on bf16
    # and fp32 x.
    return configs([_pre(16, 128, 2, 4), _pre(16, 128, 4, 4), _pre(32, 128, 1, 4), _pre(32, 64, 2, 4, stages=4),
                    _pre(64, 64, 1, 8), _pre(64, 128, 1, 8), _pre(128, 64, 1, 16), _pre(128, 128, 1, 16),
                    _pre(128, 128, 1, 8), _pre(64, 128, 2, 4)],
                   _pre(16, 32, 1, 4, stages=1))


def _pre_candidate_configs():
    # Not in the autotune list: bench_mhc.py launches each one explicitly (config=...), gates it against the naive
    # twin on bf16 x and times it; tests/test_kernels_gpu.py checks each on bf16 and fp32 x. A config joins
    # _pre_configs only after both, when it is faster on both stream dtypes (benchmarks/README.md, T8; docs/kernels.md
    # §4). None waiting. Measured and dropped: BT 128 at 4 warps with two or three programs per SM (W re-read from
    # L2 once per 128 tokens instead of 64; BC 64 / 32: 0.146-0.194 ms on bf16 streams, 0.269-0.278 on fp32, against
    # 0.125 / 0.250 for the listed BT 64 x CPS 2); around BT 64 x 4 warps, BC 64 at CPS 2 / 3 /
    # 4 (four programs fit an SM; at CPS 4 about 2 % faster on one stream dtype, 6-10 % slower on the other), CPS 3
    # / 4 at BC 128, 4 stages and BC 256; maxnreg 128 at 8 warps and CPS 2 (BT 128 x BC 64 or 128); 4 stages at
    # BT 128; BT 128 x BC 64 at 8 warps; BT 256 x BC 64 / 128 and BT 512 x BC 32 at 16 warps; a register prefetch
    # of the next chunk in place of Triton's pipelining; the persistent loop flattened with pass 1 (split mix).
    # BT 32 with three programs per SM at 4 warps (168 registers; 0.257 ms on bf16 streams) and BT 32 x BC 64 at 2
    # warps with four or five per SM (mma.sync; 0.170 / 0.244 ms), against 0.126 for the listed BT 64 x CPS 2 (run 45).
    return []


PRE_CANDIDATE_CONFIGS = _pre_candidate_configs()


@jit
def _dot(a, b, acc, EMUL: tl.constexpr):
    """acc + a b; EMUL: fp32 operands (the interpreter multiplies bf16 bit patterns, docs/kernels.md §7)."""
    if EMUL:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@jit
def _split_bf16(v):
    """fp32 v -> (hi, lo) bf16 with v = hi + lo + O(2^-17 |v|)."""
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@jit
def _mhc_split_w_kernel(FN, WH, WL, N: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr):
    """fn (G n, n d) fp32 -> WH, WL (2 NP^2, n d) bf16: rows in the pre kernel's accumulator order, fn = WH + WL +
    O(2^-17 |fn|), zero rows for padding. One launch per forward (fn changes every optimizer step)."""
    H: tl.constexpr = NP * NP
    ND: tl.constexpr = N * D
    c = tl.arange(0, 2 * H)
    hc = c // H
    ci = (c % H) // NP
    cj = c % NP
    wrow = tl.where(hc == 0, 2 * N + ci * N + cj, ci * N + cj)
    wvalid = (cj < N) & (((hc == 0) & (ci < N)) | ((hc == 1) & (ci < 2)))
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    km = k < ND
    w = tl.load(FN + wrow[:, None] * ND + k[None, :], mask=wvalid[:, None] & km[None, :], other=0.0)
    hi, lo = _split_bf16(w)
    tl.store(WH + c[:, None] * ND + k[None, :], hi, mask=km[None, :])
    tl.store(WL + c[:, None] * ND + k[None, :], lo, mask=km[None, :])


@autotune(configs=_pre_configs(), key=["N", "D", "SPLIT", "MIX", "SAVE"])
@jit
def _mhc_pre_kernel(X, FN, WH, WL, SC, BASE, U, COEF, MU, RHO, NTOK, norm_eps, eps,
                    N: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr,
                    SPLIT: tl.constexpr, EMUL: tl.constexpr, MIX: tl.constexpr, SAVE: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, CPS: tl.constexpr):
    H: tl.constexpr = NP * NP
    NC: tl.constexpr = 2 * H
    ND: tl.constexpr = N * D
    GN: tl.constexpr = (2 + N) * N
    NDC: tl.constexpr = (D + BC - 1) // BC
    tl.static_assert(BC % 8 == 0, "BC: a multiple of 8 (the sum of squares is kept per 8 channels)")
    # accumulator column c -> W row: c < H: res (i, j) = (c // NP, c % NP); c >= H: row (c - H) // NP = 0 pre, 1 post
    c = tl.arange(0, NC)
    hc = c // H
    ci = (c % H) // NP
    cj = c % NP
    wrow = tl.where(hc == 0, 2 * N + ci * N + cj, ci * N + cj)
    wvalid = (cj < N) & (((hc == 0) & (ci < N)) | ((hc == 1) & (ci < 2)))
    cols = tl.arange(0, BC)
    ii = tl.arange(0, NP)[None, :, None]
    jj = tl.arange(0, NP)[None, None, :]
    jn = tl.arange(0, NP)[None, :]
    a_c = tl.load(SC + tl.where(hc == 0, 2, tl.minimum(ci, 1)))               # alpha_res / alpha_pre / alpha_post
    b_c = tl.load(BASE + wrow, mask=wvalid, other=0.0)
    h3 = tl.reshape(hc, [1, 2, H])
    res = (ii < N) & (jj < N)
    for tb in range(tl.program_id(0), tl.cdiv(NTOK, BT), tl.num_programs(0)):   # persistent over token blocks
        tok = tb * BT + tl.arange(0, BT)
        tmask = tok < NTOK
        xrow = tok.to(tl.int64) * ND                                           # (BT,)
        acc = tl.zeros([BT, NC], tl.float32)
        ssp = tl.zeros([BT, BC // 8], tl.float32)                            # sum(x^2), per 8 channels
        for t in range(0, NDC * N):                                               # pass 1: chunk-major, stream-minor
            dd = (t // N) * BC + cols
            k = (t % N) * D + dd
            km = dd < D
            xv = tl.load(X + xrow[:, None] + k[None, :], mask=tmask[:, None] & km[None, :], other=0.0,
                         eviction_policy="evict_last")                            # (BT, BC)
            xf = xv.to(tl.float32)
            ssp += tl.sum(tl.reshape(xf * xf, [BT, BC // 8, 8]), 2)           # in-thread adds, no shuffles
            if SPLIT == 0:
                wv = tl.load(FN + wrow[:, None] * ND + k[None, :], mask=wvalid[:, None] & km[None, :], other=0.0)
                acc = tl.dot(xf, tl.trans(wv), acc, input_precision="ieee")      # (NC, BC) fp32 rows of W
            else:
                # WH / WL: (NC, ND) bf16 in the accumulator's column order; padding rows masked (no traffic)
                wp = k[None, :] + c.to(tl.int64)[:, None] * ND
                wm = wvalid[:, None] & km[None, :]
                whi = tl.trans(tl.load(WH + wp, mask=wm, other=0.0, eviction_policy="evict_last"))
                wlo = tl.trans(tl.load(WL + wp, mask=wm, other=0.0, eviction_policy="evict_last"))
                if SPLIT == 1:
                    # bf16 x (exact) is the MMAs' operand straight from its pipelined shared-memory buffer, which the
                    # pipeline refills right after this chunk, and Triton gives x (read by the MMAs and by the sum
                    # of squares) no spare buffer: the chunk's products go to a fresh tile added to acc, not chained
                    # into acc's MMAs, so that they complete inside the iteration (docs/kernels.md §4)
                    xb = xv.to(tl.bfloat16)
                    part = _dot(xb, wlo, tl.zeros([BT, NC], tl.float32), EMUL)
                    acc += _dot(xb, whi, part, EMUL)
                else:                                                             # operands from registers
                    xb, xl = _split_bf16(xf)
                    acc = _dot(xl, whi, acc, EMUL)
                    acc = _dot(xb, wlo, acc, EMUL)
                    acc = _dot(xb, whi, acc, EMUL)
        rho = 1.0 / tl.sqrt(tl.sum(ssp, 1) / ND + norm_eps)
        if SAVE:                                                                  # for the backward: mu, rho
            tl.store(MU + tok.to(tl.int64)[:, None] * GN + wrow[None, :], acc * rho[:, None],
                     mask=tmask[:, None] & wvalid[None, :])
            tl.store(RHO + tok, rho, mask=tmask)
        z = (acc * rho[:, None]) * a_c[None, :] + b_c[None, :]                    # (BT, NC)
        z3 = tl.reshape(z, [BT, 2, H])
        zr = tl.reshape(tl.sum(tl.where(h3 == 0, z3, 0.0), 1), [BT, NP, NP])      # res logits (i, j)
        zp = tl.reshape(tl.sum(tl.where(h3 == 1, z3, 0.0), 1), [BT, NP, NP])      # row 0 pre, row 1 post
        # Sinkhorn (docs §1.2 step 4): softmax over j + eps, column-normalise, then (ITERS - 1) x (row, column)
        zm = tl.where(res, zr, float("-inf"))
        mx = tl.max(zm, 2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.where(res, tl.exp(zm - mx[:, :, None]), 0.0)
        se = tl.sum(e, 2)
        se = tl.where(se == 0.0, 1.0, se)
        # each normalisation: one reciprocal per row / column, then a multiply per entry
        P = tl.where(res, e * (1.0 / se)[:, :, None] + eps, 0.0)
        P = P * (1.0 / (tl.sum(P, 1) + eps))[:, None, :]
        for _ in range(ITERS - 1):
            P = P * (1.0 / (tl.sum(P, 2) + eps))[:, :, None]
            P = P * (1.0 / (tl.sum(P, 1) + eps))[:, None, :]
        sig = 1.0 / (1.0 + tl.exp(-zp))
        AC = tl.where(ii == 0, sig + eps, 2.0 * sig)                               # row 0: A, row 1: C
        cbase = COEF + tok.to(tl.int64)[:, None, None] * GN
        tm3 = tmask[:, None, None]
        tl.store(cbase + ii * N + jj, AC, mask=tm3 & (ii < 2) & (jj < N))
        tl.store(cbase + 2 * N + ii * N + jj, P, mask=tm3 & res)
        if MIX:
            A = tl.sum(tl.where(ii == 0, AC, 0.0), 1)                             # (BT, NP)
            for q in range(0, NDC):                                               # pass 2, reverse chunk order
                dd = (NDC - 1 - q) * BC + cols
                dm = tmask[:, None] & (dd[None, :] < D)
                u = tl.zeros([BT, BC], tl.float32)
                for i in tl.static_range(N):
                    a_i = tl.sum(tl.where(jn == i, A, 0.0), 1)
                    xi = tl.load(X + xrow[:, None] + i * D + dd[None, :], mask=dm, other=0.0,
                                 eviction_policy="evict_first").to(tl.float32)
                    u += a_i[:, None] * xi
                tl.store(U + tok.to(tl.int64)[:, None] * D + dd[None, :], u.to(U.dtype.element_ty), mask=dm)


@jit
def _mhc_mix_kernel(X, COEF, U, NTOK, N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    """mix="split": u = sum_i A_i x_i from x (BT tokens x BD channels of every stream) and coef[:, :N] = A."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < NTOK
    tok64 = tok.to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = tmask[:, None] & (dd[None, :] < D)
    jj = tl.arange(0, NP)
    A = tl.load(COEF + tok64[:, None] * (G * N) + jj[None, :], mask=tmask[:, None] & (jj[None, :] < N), other=0.0)
    u = tl.zeros([BT, BD], tl.float32)
    for i in tl.static_range(N):
        a_i = tl.sum(tl.where(jj[None, :] == i, A, 0.0), 1)                       # (BT,)
        xi = tl.load(X + tok64[:, None] * (N * D) + i * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
        u += a_i[:, None] * xi
    tl.store(U + tok64[:, None] * D + dd[None, :], u.to(U.dtype.element_ty), mask=dm)


@jit
def _mhc_post_kernel(Y, X, COEF, OUT, NTOK,
                     N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr, TMAJ: tl.constexpr):
    """x'_j = C_j y + sum_i P_ij x_i for BT tokens x BD channels. TMAJ: a 1-D grid whose neighbouring programs take
    the channel blocks of one token block (the block's streams are one contiguous span of memory); otherwise grid
    (token blocks, channel blocks), neighbours taking one channel block of consecutive token blocks."""
    NDB: tl.constexpr = (D + BD - 1) // BD
    if TMAJ:
        tb, db = tl.program_id(0) // NDB, tl.program_id(0) % NDB
    else:
        tb, db = tl.program_id(0), tl.program_id(1)
    tok = tb * BT + tl.arange(0, BT)
    tmask = tok < NTOK
    tok64 = tok.to(tl.int64)
    dd = db * BD + tl.arange(0, BD)
    dm = tmask[:, None] & (dd[None, :] < D)
    jj = tl.arange(0, NP)
    jm = tmask[:, None] & (jj[None, :] < N)
    y = tl.load(Y + tok64[:, None] * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
    Cj = tl.load(COEF + tok64[:, None] * (G * N) + N + jj[None, :], mask=jm, other=0.0)
    out = Cj[:, :, None] * y[:, None, :]                                        # (BT, NP, BD)
    for i in tl.static_range(N):
        xi = tl.load(X + tok64[:, None] * (N * D) + i * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
        Pi = tl.load(COEF + tok64[:, None] * (G * N) + 2 * N + i * N + jj[None, :], mask=jm, other=0.0)
        out += Pi[:, :, None] * xi[:, None, :]
    j3 = jj[None, :, None]
    tl.store(OUT + tok64[:, None, None] * (N * D) + j3 * D + dd[None, None, :], out.to(OUT.dtype.element_ty),
             mask=dm[:, None, :] & (j3 < N))


# ---------------------------------------------------------------------------------------------------------------
# Backward kernels (docs §1.2; per token, c = mix index, g = its group pre / post / res, a_g = scale[g]):
#   post:  dy = sum_j C_j dx'_j,  dx_i = sum_j P_ij dx'_j,  dC_j = <dx'_j, y>,  dP_ij = <x_i, dx'_j>
#   pre:   dA_i = <du, x_i> (+ dcoef_A);  dz_pre = dA sig (1 - sig), dz_post = dC 2 sig (1 - sig), dz_res = Sinkhorn^T
#          dmu = a_g dz;  dbase = sum_tokens dz;  dscale_g = sum_tokens sum_{c in g} dz_c mu_c
#          dx = dXa + A (x) du + rho dmu W - (rho^2 / (n d)) <dmu, mu> vec(x)      (rho = 1/sqrt(mean v^2 + eps))
#          dW = sum_tokens (rho dmu)^T vec(x)                                       (_mhc_dw_kernel)
#   Sinkhorn^T: every normalisation P' = P / (s + eps) (s = sum over the normalised axis) has the adjoint
#          dP = (dP' - sum_axis(dP' P')) / (s + eps); the softmax + eps step has dz = p (dp - sum_j dp p).
#          The backward kernel recomputes the forward from the saved mu, parks the 2 ITERS - 1 denominators s + eps
#          in a per-program scratch (L1/L2-hot, (2 ITERS - 1) BT n fp32) and walks back from the final P, each
#          step's input rebuilt as output x denominator (one more rounding per step: ~40 ulp at most at 20 iters).
# ---------------------------------------------------------------------------------------------------------------

@jit
def _mhc_post_bwd_kernel(Y, X, COEF, DOUT, DY, DX, DCOEF, NTOK,
                         N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr,
                         BT: tl.constexpr, BD: tl.constexpr):
    """One program per BT tokens, walking all D channels (dC, dP reduce over channels in registers: no atomics)."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < NTOK
    tok64 = tok.to(tl.int64)
    jj = tl.arange(0, NP)
    jm = tmask[:, None] & (jj[None, :] < N)
    j3 = jj[None, :, None]
    i3 = tl.arange(0, NP)[None, :, None]
    jk = tl.arange(0, NP)[None, None, :]
    Cj = tl.load(COEF + tok64[:, None] * (G * N) + N + jj[None, :], mask=jm, other=0.0)          # (BT, NP)
    dC = tl.zeros([BT, NP], tl.float32)
    dP = tl.zeros([BT, NP, NP], tl.float32)                                                     # [t, i, j]
    for q in range(0, (D + BD - 1) // BD):
        dd = q * BD + tl.arange(0, BD)
        dm = tmask[:, None] & (dd[None, :] < D)
        dm3 = dm[:, None, :] & (j3 < N)
        y = tl.load(Y + tok64[:, None] * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
        g = tl.load(DOUT + tok64[:, None, None] * (N * D) + j3 * D + dd[None, None, :], mask=dm3,
                    other=0.0).to(tl.float32)                                                   # (BT, NP j, BD)
        tl.store(DY + tok64[:, None] * D + dd[None, :], tl.sum(Cj[:, :, None] * g, 1).to(DY.dtype.element_ty),
                 mask=dm)
        dC += tl.sum(g * y[:, None, :], 2)
        for i in tl.static_range(N):
            Pi = tl.load(COEF + tok64[:, None] * (G * N) + 2 * N + i * N + jj[None, :], mask=jm, other=0.0)
            xi = tl.load(X + tok64[:, None] * (N * D) + i * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
            tl.store(DX + tok64[:, None] * (N * D) + i * D + dd[None, :],
                     tl.sum(Pi[:, :, None] * g, 1).to(DX.dtype.element_ty), mask=dm)
            dP += tl.where(i3 == i, tl.sum(g * xi[:, None, :], 2)[:, None, :], 0.0)
    cb = DCOEF + tok64[:, None] * (G * N)
    tl.store(cb + jj[None, :], tl.zeros([BT, NP], tl.float32), mask=jm)                        # dA: post has none
    tl.store(cb + N + jj[None, :], dC, mask=jm)
    tl.store(cb[:, :, None] + 2 * N + i3 * N + jk, dP, mask=tmask[:, None, None] & (i3 < N) & (jk < N))


@jit
def _mhc_pre_bwd_kernel(X, DU, DXIN, DCOEF, MU, RHO, SC, BASE, FN, WH, WL, DX, DMUS, DBASE, DSCC, SCR, NTOK, eps,
                        N: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr,
                        SPLIT: tl.constexpr, EMUL: tl.constexpr, HAS_DXIN: tl.constexpr,
                        BT: tl.constexpr, BC: tl.constexpr):
    """Persistent over blocks of BT tokens. pass 1: dA = <du, x_i>; epilogue: maps from the saved mu, Sinkhorn^T,
    dz, dmu (written for _mhc_dw_kernel), dbase / dscale partials (fp32 atomics, one per block and mix); pass 2
    (L2-hot re-read of x and du): dx. Column layout of the [BT, NC] tiles as in _mhc_pre_kernel."""
    H: tl.constexpr = NP * NP
    NC: tl.constexpr = 2 * H
    ND: tl.constexpr = N * D
    GN: tl.constexpr = (2 + N) * N
    NDC: tl.constexpr = (D + BC - 1) // BC
    SL: tl.constexpr = 2 * ITERS - 1                                             # normalisations after the softmax
    c = tl.arange(0, NC)
    hc = c // H
    ci = (c % H) // NP
    cj = c % NP
    wrow = tl.where(hc == 0, 2 * N + ci * N + cj, ci * N + cj)
    wvalid = (cj < N) & (((hc == 0) & (ci < N)) | ((hc == 1) & (ci < 2)))
    cols = tl.arange(0, BC)
    ii = tl.arange(0, NP)[None, :, None]
    jj = tl.arange(0, NP)[None, None, :]
    jn = tl.arange(0, NP)[None, :]
    a_c = tl.load(SC + tl.where(hc == 0, 2, tl.minimum(ci, 1)))
    b_c = tl.load(BASE + wrow, mask=wvalid, other=0.0)
    h3 = tl.reshape(hc, [1, 2, H])
    res = (ii < N) & (jj < N)
    acm = (ii < 2) & (jj < N)
    scv = SCR + tl.program_id(0).to(tl.int64) * (SL * BT * NP) + tl.arange(0, BT)[:, None] * NP + jn  # (BT, NP)
    for tb in range(tl.program_id(0), tl.cdiv(NTOK, BT), tl.num_programs(0)):
        tok = tb * BT + tl.arange(0, BT)
        tmask = tok < NTOK
        tok64 = tok.to(tl.int64)
        xrow = tok64 * ND
        # pass 1: dA_i = <du, x_i>
        dA = tl.zeros([BT, NP], tl.float32)
        for q in range(0, NDC):
            dd = q * BC + cols
            dm = tmask[:, None] & (dd[None, :] < D)
            du = tl.load(DU + tok64[:, None] * D + dd[None, :], mask=dm, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            for i in tl.static_range(N):
                xi = tl.load(X + xrow[:, None] + i * D + dd[None, :], mask=dm, other=0.0,
                             eviction_policy="evict_last").to(tl.float32)
                dA += tl.where(jn == i, tl.sum(du * xi, 1)[:, None], 0.0)
        # maps from the saved mu (exactly the forward kernel's epilogue), Sinkhorn inputs parked in the scratch
        mu = tl.load(MU + tok64[:, None] * GN + wrow[None, :], mask=tmask[:, None] & wvalid[None, :], other=0.0)
        rho = tl.load(RHO + tok, mask=tmask, other=0.0)
        z = mu * a_c[None, :] + b_c[None, :]
        z3 = tl.reshape(z, [BT, 2, H])
        zr = tl.reshape(tl.sum(tl.where(h3 == 0, z3, 0.0), 1), [BT, NP, NP])
        zp = tl.reshape(tl.sum(tl.where(h3 == 1, z3, 0.0), 1), [BT, NP, NP])
        zm = tl.where(res, zr, float("-inf"))
        mx = tl.max(zm, 2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.where(res, tl.exp(zm - mx[:, :, None]), 0.0)
        se = tl.sum(e, 2)
        se = tl.where(se == 0.0, 1.0, se)
        sm = e / se[:, :, None]                                                    # softmax over j
        P = tl.where(res, sm + eps, 0.0)
        tl.debug_barrier()                                                         # the previous block's reads done
        r = tl.sum(P, 1) + eps                                                     # (BT, NP) per column j
        tl.store(scv, r)
        P = P / r[:, None, :]
        for k in range(ITERS - 1):
            r = tl.sum(P, 2) + eps                                                 # per row i
            tl.store(scv + (1 + 2 * k) * (BT * NP), r)
            P = P / r[:, :, None]
            r = tl.sum(P, 1) + eps
            tl.store(scv + (2 + 2 * k) * (BT * NP), r)
            P = P / r[:, None, :]
        tl.debug_barrier()                                                         # scratch written by every thread
        cb = DCOEF + tok64[:, None, None] * GN
        gP = tl.load(cb + 2 * N + ii * N + jj, mask=tmask[:, None, None] & res, other=0.0)
        # reverse: P holds each step's output; its input is P r (a rounding of the forward's, ~1 ulp per step)
        for kk in range(ITERS - 1):
            k = ITERS - 2 - kk
            rc = tl.load(scv + (2 + 2 * k) * (BT * NP))[:, None, :]                # column step
            gP = tl.where(res, (gP - tl.sum(gP * P, 1)[:, None, :]) / rc, 0.0)
            P = P * rc
            rr = tl.load(scv + (1 + 2 * k) * (BT * NP))[:, :, None]                # row step
            gP = tl.where(res, (gP - tl.sum(gP * P, 2)[:, :, None]) / rr, 0.0)
            P = P * rr
        rc = tl.load(scv)[:, None, :]                                              # first column step
        gP = tl.where(res, (gP - tl.sum(gP * P, 1)[:, None, :]) / rc, 0.0)
        dzr = tl.where(res, sm * (gP - tl.sum(gP * sm, 2)[:, :, None]), 0.0)      # softmax
        sig = 1.0 / (1.0 + tl.exp(-zp))
        gAC = tl.load(cb + ii * N + jj, mask=tmask[:, None, None] & acm, other=0.0)
        gAC += tl.where(ii == 0, dA[:, None, :], 0.0)
        dzp = tl.where(acm, gAC * tl.where(ii == 0, 1.0, 2.0) * sig * (1.0 - sig), 0.0)
        dz = tl.reshape(tl.where(h3 == 0, tl.reshape(dzr, [BT, 1, H]), tl.reshape(dzp, [BT, 1, H])), [BT, NC])
        dz = tl.where(tmask[:, None] & wvalid[None, :], dz, 0.0)
        tl.atomic_add(DBASE + wrow, tl.sum(dz, 0), mask=wvalid, sem="relaxed")
        tl.atomic_add(DSCC + wrow, tl.sum(dz * mu, 0), mask=wvalid, sem="relaxed")
        dmus = dz * a_c[None, :] * rho[:, None]                                    # rho dmu (BT, NC)
        tl.store(DMUS + tok64[:, None] * NC + c[None, :], dmus, mask=tmask[:, None])
        kv = tl.sum(dmus * mu, 1) * rho / ND                                       # rho^2 <dmu, mu> / (n d)
        A = tl.sum(tl.where(ii == 0, sig + eps, 0.0), 1)                           # (BT, NP)
        if SPLIT != 0:
            ghi, glo = _split_bf16(dmus)
        # pass 2: dx = dXa + A_i du + rho dmu W - kv x (re-reads x and du, L2-hot)
        for t in range(0, NDC * N):
            i = t % N
            dd = (t // N) * BC + cols
            km = dd < D
            kx = i * D + dd
            dm = tmask[:, None] & km[None, :]
            if SPLIT == 0:
                wv = tl.load(FN + wrow[:, None] * ND + kx[None, :], mask=wvalid[:, None] & km[None, :], other=0.0)
                proj = tl.dot(dmus, wv, input_precision="ieee")                    # (BT, BC)
            else:
                wp = kx[None, :] + c.to(tl.int64)[:, None] * ND
                wm = wvalid[:, None] & km[None, :]
                whi = tl.load(WH + wp, mask=wm, other=0.0, eviction_policy="evict_last")
                wlo = tl.load(WL + wp, mask=wm, other=0.0, eviction_policy="evict_last")
                proj = tl.zeros([BT, BC], tl.float32)
                proj = _dot(glo, whi, proj, EMUL)
                proj = _dot(ghi, wlo, proj, EMUL)
                proj = _dot(ghi, whi, proj, EMUL)
            xi = tl.load(X + xrow[:, None] + kx[None, :], mask=dm, other=0.0, eviction_policy="evict_first")
            du = tl.load(DU + tok64[:, None] * D + dd[None, :], mask=dm, other=0.0).to(tl.float32)
            a_i = tl.sum(tl.where(jn == i, A, 0.0), 1)
            dx = a_i[:, None] * du + proj - kv[:, None] * xi.to(tl.float32)
            if HAS_DXIN:
                dx += tl.load(DXIN + xrow[:, None] + kx[None, :], mask=dm, other=0.0).to(tl.float32)
            tl.store(DX + xrow[:, None] + kx[None, :], dx.to(DX.dtype.element_ty), mask=dm)


@jit
def _mhc_dw_kernel(DMUS, X, DW, NTOK, N: tl.constexpr, D: tl.constexpr, NP: tl.constexpr,
                   SPLIT: tl.constexpr, EMUL: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """dW (G n, n d) += sum over this program's token blocks of (rho dmu)^T vec(x): grid (n d / BK, token splits),
    a [NC, BK] fp32 tile in registers, one fp32 atomic add per program at the end. Same precision split as the
    forward projection (bf16 hi + lo of the fp32 operand; bf16 x exact)."""
    H: tl.constexpr = NP * NP
    NC: tl.constexpr = 2 * H
    ND: tl.constexpr = N * D
    c = tl.arange(0, NC)
    hc = c // H
    ci = (c % H) // NP
    cj = c % NP
    wrow = tl.where(hc == 0, 2 * N + ci * N + cj, ci * N + cj)
    wvalid = (cj < N) & (((hc == 0) & (ci < N)) | ((hc == 1) & (ci < 2)))
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    km = k < ND
    acc = tl.zeros([NC, BK], tl.float32)
    for tb in range(tl.program_id(1), tl.cdiv(NTOK, BT), tl.num_programs(1)):
        tok = (tb * BT + tl.arange(0, BT)).to(tl.int64)
        tmask = tok < NTOK
        g = tl.trans(tl.load(DMUS + tok[:, None] * NC + c[None, :], mask=tmask[:, None], other=0.0))  # (NC, BT)
        xv = tl.load(X + tok[:, None] * ND + k[None, :], mask=tmask[:, None] & km[None, :], other=0.0)
        if SPLIT == 0:
            acc = tl.dot(g, xv.to(tl.float32), acc, input_precision="ieee")
        else:
            ghi, glo = _split_bf16(g)
            if SPLIT == 1:
                xb = xv.to(tl.bfloat16)
            else:
                xb, xl = _split_bf16(xv.to(tl.float32))
                acc = _dot(ghi, xl, acc, EMUL)
            acc = _dot(glo, xb, acc, EMUL)
            acc = _dot(ghi, xb, acc, EMUL)
    tl.atomic_add(DW + wrow[:, None] * ND + k[None, :], acc, mask=wvalid[:, None] & km[None, :], sem="relaxed")


def _sm_count(device) -> int:
    """Streaming multiprocessors of the device (the persistent grid's size unit); 1 under the interpreter, so the
    CPU tests walk several token blocks per program."""
    return 1 if INTERPRET or device.type != "cuda" else sm_count(device)


def _split_mode(x, dot: str) -> tuple[int, bool]:
    """(SPLIT, EMUL) for the projection dot; see the module docstring."""
    if dot not in ("auto", "fp32", "bf16x3"):
        raise ValueError(f"mhc_pre: dot={dot!r} is not allowed: 'auto', 'fp32' (plain fp32 dot) or 'bf16x3'")
    if dot == "fp32" or (dot == "auto" and INTERPRET):
        return SPLIT_FP32, False
    return (SPLIT_W if x.dtype == torch.bfloat16 else SPLIT_XW), INTERPRET


def _split_w(fn32, n, d, NP, split):
    """fn (G n, n d) fp32 -> (WH, WL) bf16 in the accumulator's row order (SPLIT_FP32: fn itself, unused)."""
    if split == SPLIT_FP32:
        return fn32, fn32
    wh = torch.empty(2 * NP * NP, n * d, device=fn32.device, dtype=torch.bfloat16)
    wl = torch.empty_like(wh)
    _mhc_split_w_kernel[(triton.cdiv(n * d, 256),)](fn32, wh, wl, N=n, D=d, NP=NP, BK=256, num_warps=4)
    return wh, wl


# elementwise launch parameters (not autotuned; bench_mhc.py times them): BT tokens x BD channels per program of the
# post forward and of the split mix's u kernel; POST_BT None: 8 tokens on bf16 streams, 16 on fp32 (the faster of
# each in bench_mhc.py's post_sweep); POST_TOKEN_MAJOR: the post's program order (_mhc_post_kernel's TMAJ; True, the
# 1-D token-major order, was the faster on both stream dtypes in post_sweep, docs/kernels.md §4)
POST_BT, POST_BD, POST_WARPS, POST_TOKEN_MAJOR = None, 128, 4, True
MIX_BT, MIX_BD, MIX_WARPS = 16, 128, 4


def mhc_pre_fwd(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6, dot: str = "auto",
                config=None, mix: str | None = None, save: bool = False):
    """-> (u, coef), or (u, coef, mu, rho) with save=True (mu (B, T, G n) fp32 = rho v W^T, rho (B, T) fp32: what
    the backward needs). config: one triton.Config of the autotune list to launch instead of the tuned choice (GPU
    tests of every config; benchmarks). mix: "fused" (u in the pre kernel's L2-hot second pass) or "split" (u by a
    second launch); None = PRE_MIX."""
    mix = PRE_MIX if mix is None else mix
    if mix not in ("fused", "split"):
        raise ValueError(f"mhc_pre: mix={mix!r} is not allowed: 'fused' or 'split'")
    check_device(x, fn)
    B, T, n, d = x.shape
    G = 2 + n
    if fn.shape != (G * n, n * d):
        raise ValueError(f"mhc_pre: fn.shape = {tuple(fn.shape)} is not allowed: ({G * n}, {n * d}) for x "
                         f"{tuple(x.shape)}")
    split, emul = _split_mode(x, dot)
    xc = x.contiguous()
    ntok = B * T
    u = torch.empty(B, T, d, device=x.device, dtype=x.dtype)
    coef = torch.empty(B, T, G * n, device=x.device, dtype=torch.float32)
    mu = torch.empty(B, T, G * n, device=x.device, dtype=torch.float32) if save else coef
    rho = torch.empty(B, T, device=x.device, dtype=torch.float32) if save else coef
    NP = max(4, next_pow2(n))
    fn32 = fn.float().contiguous()
    wh, wl = _split_w(fn32, n, d, NP, split)
    if ntok:
        sms = _sm_count(x.device)
        args = (xc, fn32, wh, wl, scale.float().contiguous(), base.float().contiguous(), u, coef, mu, rho, ntok,
                norm_eps, eps)
        meta = dict(N=n, D=d, NP=NP, ITERS=iters, SPLIT=split, EMUL=emul, MIX=mix == "fused", SAVE=save)
        if config is None:
            _mhc_pre_kernel[lambda META: (min(triton.cdiv(ntok, META["BT"]), META["CPS"] * sms),)](*args, **meta)
        else:
            kw = config.all_kwargs()
            _mhc_pre_kernel.fn[(min(triton.cdiv(ntok, kw["BT"]), kw["CPS"] * sms),)](*args, **meta, **kw)
        if mix == "split":
            BT, BD = MIX_BT, min(MIX_BD, max(16, next_pow2(d)))
            _mhc_mix_kernel[(triton.cdiv(ntok, BT), triton.cdiv(d, BD))](xc, coef, u, ntok, N=n, D=d, G=G,
                                                                        NP=next_pow2(n), BT=BT, BD=BD,
                                                                        num_warps=MIX_WARPS)
    return (u, coef, mu, rho) if save else (u, coef)


def mhc_post_fwd(y, x, coef):
    check_device(y, x, coef)
    B, T, n, d = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ntok = B * T
    BT, BD = POST_BT or (8 if x.element_size() == 2 else 16), min(POST_BD, max(16, next_pow2(d)))
    if ntok:
        nt, nd = triton.cdiv(ntok, BT), triton.cdiv(d, BD)
        grid = (nt * nd,) if POST_TOKEN_MAJOR else (nt, nd)
        _mhc_post_kernel[grid](y.contiguous(), x.contiguous(), coef.float().contiguous(), out, ntok,
                               N=n, D=d, G=2 + n, NP=next_pow2(n), BT=BT, BD=BD, TMAJ=POST_TOKEN_MAJOR,
                               num_warps=POST_WARPS)
    return out


# backward launch parameters (not autotuned; bench_mhc.py times them): pre bwd BT tokens x BC channels per step,
# BWD_CPS programs per SM; dW: BK channels per program, token splits so that about DW_WAVES programs per SM run;
# post bwd: BT tokens per program, BD channels per step
# (the fastest correct entries of bench_mhc.py's sweeps at the small bf16 shapes, mhc.json)
BWD_BT, BWD_BC, BWD_CPS, BWD_WARPS = 8, 128, 4, 4
DW_BT, DW_BK, DW_WAVES = 64, 256, 4
POST_BWD_BT, POST_BWD_BD, POST_BWD_WARPS = 8, 128, 4


def mhc_post_bwd(y, x, coef, dout):
    """-> dy (B, T, d) in y's dtype, dx (B, T, n, d) in x's dtype, dcoef (B, T, G n) fp32 (zero in the A slots)."""
    check_device(y, x, coef, dout)
    B, T, n, d = x.shape
    ntok = B * T
    dy = torch.empty(B, T, d, device=x.device, dtype=y.dtype)
    dx = torch.empty(B, T, n, d, device=x.device, dtype=x.dtype)
    dcoef = torch.empty(B, T, (2 + n) * n, device=x.device, dtype=torch.float32)
    BD = min(POST_BWD_BD, max(16, next_pow2(d)))
    if ntok:
        _mhc_post_bwd_kernel[(triton.cdiv(ntok, POST_BWD_BT),)](
            y.contiguous(), x.contiguous(), coef.float().contiguous(), dout.contiguous(), dy, dx, dcoef, ntok,
            N=n, D=d, G=2 + n, NP=next_pow2(n), BT=POST_BWD_BT, BD=BD, num_warps=POST_BWD_WARPS)
    return dy, dx, dcoef


def mhc_pre_bwd(x, fn, scale, base, mu, rho, du, dcoef, dxin=None, iters: int = 20, eps: float = 1e-6,
                dot: str = "auto"):
    """Gradients of (u, coef) = mhc_pre(x, fn, scale, base) from the saved mu, rho: du (B, T, d), dcoef (B, T, G n)
    (either may be None = zero), dxin (B, T, n, d) or None: a gradient already flowing into x (post's, through the
    alias of mhc_pre_triton), summed into dx in the same pass. -> dx (x's dtype), dfn, dscale, dbase (fp32)."""
    check_device(x, fn, mu)
    B, T, n, d = x.shape
    G, NP = 2 + n, max(4, next_pow2(n))
    ntok, dev = B * T, x.device
    split, emul = _split_mode(x, dot)
    fn32 = fn.float().contiguous()
    wh, wl = _split_w(fn32, n, d, NP, split)
    du = torch.zeros(B, T, d, device=dev, dtype=x.dtype) if du is None else du.contiguous()
    dcoef = torch.zeros(B, T, G * n, device=dev) if dcoef is None else dcoef.float().contiguous()
    dx = torch.empty(B, T, n, d, device=dev, dtype=x.dtype)
    dfn = torch.zeros(G * n, n * d, device=dev)
    dbase = torch.zeros(G * n, device=dev)
    dscc = torch.zeros(G * n, device=dev)                      # per mix: sum over tokens of dz mu
    if ntok:
        xc = x.contiguous()
        dmus = torch.empty(ntok, 2 * NP * NP, device=dev)         # rho dmu in the accumulator's column order
        nprog = min(triton.cdiv(ntok, BWD_BT), BWD_CPS * _sm_count(dev))
        scr = torch.empty(nprog * (2 * iters - 1) * BWD_BT * NP, device=dev)    # Sinkhorn denominators
        BC = min(BWD_BC, max(16, next_pow2(d)))
        _mhc_pre_bwd_kernel[(nprog,)](
            xc, du, dxin.contiguous() if dxin is not None else xc, dcoef, mu, rho, scale.float().contiguous(),
            base.float().contiguous(), fn32, wh, wl, dx, dmus, dbase, dscc, scr, ntok, eps,
            N=n, D=d, NP=NP, ITERS=iters, SPLIT=split, EMUL=emul, HAS_DXIN=dxin is not None, BT=BWD_BT, BC=BC,
            num_warps=BWD_WARPS)
        BK = min(DW_BK, max(16, next_pow2(n * d)))
        nk = triton.cdiv(n * d, BK)
        splits = max(1, min(triton.cdiv(ntok, DW_BT), DW_WAVES * _sm_count(dev) // nk))
        _mhc_dw_kernel[(nk, splits)](dmus, xc, dfn, ntok, N=n, D=d, NP=NP, SPLIT=split, EMUL=emul, BT=DW_BT, BK=BK,
                                     num_warps=4)
    else:
        dx.zero_() if dxin is None else dx.copy_(dxin)
    dscale = torch.stack([dscc[:n].sum(), dscc[n:2 * n].sum(), dscc[2 * n:].sum()])
    return dx, dfn, dscale, dbase


class MHCPreFn(torch.autograd.Function):
    """(x, fn, scale, base) -> (u, coef, xa); xa is x itself (a view) for mhc_post, so that post's dx arrives here
    as xa's gradient and the pre backward kernel writes dx_pre + dx_post in one pass (no separate autograd sum)."""

    @staticmethod
    def forward(ctx, x, fn, scale, base, iters, eps, norm_eps):
        if any(ctx.needs_input_grad[:4]):                     # training: keep mu, rho for the backward kernels
            u, coef, mu, rho = mhc_pre_fwd(x, fn, scale, base, iters, eps, norm_eps, save=True)
            ctx.save_for_backward(x, fn, scale, base, mu, rho)
        else:                                                 # inference: nothing saved, no extra writes
            u, coef = mhc_pre_fwd(x, fn, scale, base, iters, eps, norm_eps)
        ctx.cfg = (iters, eps)
        return u, coef, x.view_as(x)

    @staticmethod
    def backward(ctx, du, dcoef, dxa):
        x, fn, scale, base, mu, rho = ctx.saved_tensors
        dx, dfn, dscale, dbase = mhc_pre_bwd(x, fn, scale, base, mu, rho, du, dcoef, dxa, *ctx.cfg)
        return dx, dfn.to(fn.dtype), dscale.to(scale.dtype), dbase.to(base.dtype), None, None, None


class MHCPostFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, coef):
        ctx.save_for_backward(y, x, coef)
        return mhc_post_fwd(y, x, coef)

    @staticmethod
    def backward(ctx, dout):
        y, x, coef = ctx.saved_tensors
        dy, dx, dcoef = mhc_post_bwd(y, x, coef, dout)
        return dy, dx, dcoef.to(coef.dtype)


def mhc_pre_triton(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6,
                   alias: bool = False):
    """-> (u, coef), or (u, coef, xa) with alias=True: pass xa (not x) to mhc_post_triton (MHCPreFn)."""
    u, coef, xa = MHCPreFn.apply(x, fn, scale, base, iters, eps, norm_eps)
    return (u, coef, xa) if alias else (u, coef)


def mhc_post_triton(y, x, coef):
    return MHCPostFn.apply(y, x, coef)
