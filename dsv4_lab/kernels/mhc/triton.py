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
          of 10 d), but pass 1 runs free of the L2-footprint bound on the persistent grid (more programs per SM). Run
          8 measured the fused pre at 26 % of copy bandwidth (latency-bound pass 1, one 8-warp program per SM), which
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

Backward (autograd.Function): recompute-based. The backward re-runs the naive PyTorch twin under autograd on the
saved inputs and back-propagates through it (one extra forward in fp32; documented trade-off: no Triton backward
kernel for mHC yet).
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check_device, configs, next_pow2, tl, triton
from .naive import mhc_post_naive, mhc_pre_naive

SPLIT_FP32, SPLIT_W, SPLIT_XW = 0, 1, 2          # plain fp32 dot | bf16 x, W = hi + lo | x and W both split
PRE_MIX = "fused"                                # how mhc_pre forms u: "fused" | "split" (module docstring)


def _pre_configs():
    # CPS = programs per SM of the persistent grid: it bounds the x bytes in flight between pass 1 and the L2-hot
    # pass 2 (132 SMs x CPS x BT x n d x 2 B; 34-67 MB at d = 1024 against the ~50 MB L2) while BC x stages sets the
    # bytes in flight per program.
    # Not listed on purpose: (BT 64, BC 64, CPS 2, 4 warps, 4 stages), (64, 128, 4, 4 w, 3 s) and (128, 64, 2, 8 w,
    # 3 s) give coef / u off by ~7e-4 (not ~1e-6) with bf16 x on an H200 (benchmarks/README.md, history).
    return configs([triton.Config({"BT": 16, "BC": 128, "CPS": 2}, num_warps=4, num_stages=3),
                    triton.Config({"BT": 16, "BC": 128, "CPS": 4}, num_warps=4, num_stages=3),
                    triton.Config({"BT": 32, "BC": 128, "CPS": 1}, num_warps=4, num_stages=3),
                    triton.Config({"BT": 32, "BC": 64, "CPS": 2}, num_warps=4, num_stages=4),
                    triton.Config({"BT": 64, "BC": 64, "CPS": 1}, num_warps=8, num_stages=3)],
                   triton.Config({"BT": 16, "BC": 32, "CPS": 1}, num_warps=4, num_stages=1))


@triton.jit
def _dot(a, b, acc, EMUL: tl.constexpr):
    """acc + a b; EMUL: fp32 operands (the interpreter multiplies bf16 bit patterns, docs/kernels.md §7)."""
    if EMUL:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _split_bf16(v):
    """fp32 v -> (hi, lo) bf16 with v = hi + lo + O(2^-17 |v|)."""
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
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


@triton.autotune(configs=_pre_configs(), key=["N", "D", "SPLIT", "MIX"])
@triton.jit
def _mhc_pre_kernel(X, FN, WH, WL, SC, BASE, U, COEF, NTOK, norm_eps, eps,
                    N: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr,
                    SPLIT: tl.constexpr, EMUL: tl.constexpr, MIX: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, CPS: tl.constexpr):
    H: tl.constexpr = NP * NP
    NC: tl.constexpr = 2 * H
    ND: tl.constexpr = N * D
    GN: tl.constexpr = (2 + N) * N
    NDC: tl.constexpr = (D + BC - 1) // BC
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
        ss = tl.zeros([BT], tl.float32)
        for t in range(0, NDC * N):                                               # pass 1: chunk-major, stream-minor
            dd = (t // N) * BC + cols
            k = (t % N) * D + dd
            km = dd < D
            xv = tl.load(X + xrow[:, None] + k[None, :], mask=tmask[:, None] & km[None, :], other=0.0,
                         eviction_policy="evict_last")                            # (BT, BC)
            xf = xv.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
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
                    xb = xv.to(tl.bfloat16)                                       # bf16 x: exact
                else:
                    xb, xl = _split_bf16(xf)
                    acc = _dot(xl, whi, acc, EMUL)
                acc = _dot(xb, wlo, acc, EMUL)
                acc = _dot(xb, whi, acc, EMUL)
        rho = 1.0 / tl.sqrt(ss / ND + norm_eps)
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
        P = tl.where(res, e / se[:, :, None] + eps, 0.0)
        P = P / (tl.sum(P, 1)[:, None, :] + eps)
        for _ in range(ITERS - 1):
            P = P / (tl.sum(P, 2)[:, :, None] + eps)
            P = P / (tl.sum(P, 1)[:, None, :] + eps)
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


@triton.jit
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


@triton.jit
def _mhc_post_kernel(Y, X, COEF, OUT, NTOK,
                     N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr):
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < NTOK
    tok64 = tok.to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
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


_SMS: dict = {}


def _sm_count(device) -> int:
    """Streaming multiprocessors of the device (the persistent grid's size unit); 1 under the interpreter, so the
    CPU tests walk several token blocks per program."""
    if INTERPRET or device.type != "cuda":
        return 1
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _split_mode(x, dot: str) -> tuple[int, bool]:
    """(SPLIT, EMUL) for the projection dot; see the module docstring."""
    if dot not in ("auto", "fp32", "bf16x3"):
        raise ValueError(f"mhc_pre: dot={dot!r} is not allowed: 'auto', 'fp32' (plain fp32 dot) or 'bf16x3'")
    if dot == "fp32" or (dot == "auto" and INTERPRET):
        return SPLIT_FP32, False
    return (SPLIT_W if x.dtype == torch.bfloat16 else SPLIT_XW), INTERPRET


def mhc_pre_fwd(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6, dot: str = "auto",
                config=None, mix: str | None = None):
    """config: one triton.Config of the autotune list to launch instead of the tuned choice (GPU tests of every
    config; benchmarks). mix: "fused" (u in the pre kernel's L2-hot second pass) or "split" (u by a second launch);
    None = PRE_MIX."""
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
    NP = max(4, next_pow2(n))
    fn32 = fn.float().contiguous()
    if split == SPLIT_FP32:
        wh = wl = fn32                                                        # unused
    else:
        wh = torch.empty(2 * NP * NP, n * d, device=x.device, dtype=torch.bfloat16)
        wl = torch.empty_like(wh)
        _mhc_split_w_kernel[(triton.cdiv(n * d, 256),)](fn32, wh, wl, N=n, D=d, NP=NP, BK=256, num_warps=4)
    if ntok:
        sms = _sm_count(x.device)
        args = (xc, fn32, wh, wl, scale.float().contiguous(), base.float().contiguous(), u, coef, ntok, norm_eps, eps)
        meta = dict(N=n, D=d, NP=NP, ITERS=iters, SPLIT=split, EMUL=emul, MIX=mix == "fused")
        if config is None:
            _mhc_pre_kernel[lambda META: (min(triton.cdiv(ntok, META["BT"]), META["CPS"] * sms),)](*args, **meta)
        else:
            kw = config.all_kwargs()
            _mhc_pre_kernel.fn[(min(triton.cdiv(ntok, kw["BT"]), kw["CPS"] * sms),)](*args, **meta, **kw)
        if mix == "split":
            BT, BD = 16, min(128, max(16, next_pow2(d)))
            _mhc_mix_kernel[(triton.cdiv(ntok, BT), triton.cdiv(d, BD))](xc, coef, u, ntok, N=n, D=d, G=G,
                                                                        NP=next_pow2(n), BT=BT, BD=BD, num_warps=4)
    return u, coef


def mhc_post_fwd(y, x, coef):
    check_device(y, x, coef)
    B, T, n, d = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ntok = B * T
    BT, BD = 16, min(128, max(16, next_pow2(d)))
    if ntok:
        _mhc_post_kernel[(triton.cdiv(ntok, BT), triton.cdiv(d, BD))](
            y.contiguous(), x.contiguous(), coef.float().contiguous(), out, ntok,
            N=n, D=d, G=2 + n, NP=next_pow2(n), BT=BT, BD=BD, num_warps=4)
    return out


class MHCPreFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, scale, base, iters, eps, norm_eps):
        u, coef = mhc_pre_fwd(x, fn, scale, base, iters, eps, norm_eps)
        ctx.save_for_backward(x, fn, scale, base)
        ctx.cfg = (iters, eps, norm_eps)
        return u, coef

    @staticmethod
    def backward(ctx, du, dcoef):
        x, fn, scale, base = ctx.saved_tensors
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (x, fn, scale, base)]
            u, coef = mhc_pre_naive(*ins, *ctx.cfg)                      # recompute (see module docstring)
            outs, gouts = [], []
            for o, g in ((u, du), (coef, dcoef)):
                if g is not None:
                    outs.append(o)
                    gouts.append(g)
            grads = torch.autograd.grad(outs, ins, gouts, allow_unused=True)
        return (*grads, None, None, None)


class MHCPostFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, coef):
        ctx.save_for_backward(y, x, coef)
        return mhc_post_fwd(y, x, coef)

    @staticmethod
    def backward(ctx, dout):
        y, x, coef = ctx.saved_tensors
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (y, x, coef)]
            out = mhc_post_naive(*ins)
            return torch.autograd.grad(out, ins, dout, allow_unused=True)


def mhc_pre_triton(x, fn, scale, base, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    return MHCPreFn.apply(x, fn, scale, base, iters, eps, norm_eps)


def mhc_post_triton(y, x, coef):
    return MHCPostFn.apply(y, x, coef)
