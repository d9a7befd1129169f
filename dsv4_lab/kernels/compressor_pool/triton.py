"""Fused compressor pool + ape + RMSNorm_w (+ RoPE) in one Triton launch, forward and backward (docs/kernels.md §11;
docs §2.3, §3, §2.6).

Interface (naive.py's `compressor_pool_naive`, same shapes):
    C, Z   (B, n, m, k c) fp32 projections of n complete blocks (k = 2 overlapping, 1 plain); innermost dim contiguous,
           the other strides free (the decode path passes slices of its concatenated state)
    ape    (m, k c) or None, fp32 or bf16 (converted to fp32 on load): added to Z inside the kernel (None = Z already
           includes it, as the decode cache's scores do)
    weight (c,) the RMSNorm weight, fp32 or bf16 (converted on load); eps float
    prev_C, prev_Z (B, m, c) or None (overlap only): the b series of the block before block 0, prev_Z including ape;
           None = the b slots of entry 0 score -inf and add nothing
    cos, sin (max_len, r/2) or None: the rotary tables (RotaryTable.cos / .sin, rows contiguous), first_block int;
           entry i is rotated at position (first_block + i) m on channels [c - r, c) (c - r even), the kernel
           reading the table rows itself
    out    (B, n, c) fp32
Gradients (CompressorPoolFn, when grad mode is on and C, Z, ape or weight requires grad): dC, dZ (B, n, m, k c),
d ape (m, k c), d weight (c,), each in its input's dtype; prev_C, prev_Z, cos, sin get none (they must not require
grad: decode state and rotary buffers).

Forward. One program owns BN whole entries (rows of c channels, so the RMSNorm's sum over c stays in registers). It
walks the slots in chunks of MB: overlapping, first the b slots (block i-1, channels [0, c); for entry 0 the prev
rows, or -inf without them), then the a slots (block i, channels [c, 2c); plain: the block's m slots, channels
[0, c)), each chunk a [BN, MB, BC] tile of C and Z (+ ape), folded into a running per-channel max, sum of e^(z - max)
and sum of e^(z - max) C (online softmax in fp32, rescaled when the max grows). Then x = num / den, the RMSNorm with
its weight, with tables the rotation of the interleaved pairs (2j, 2j+1) (the [BN, BC] row split into its even and
odd channels, out0 = x0 cos - x1 sin, out1 = x0 sin + x1 cos, joined back), and one store of the entry. BC =
pow2(c); padded slots / channels are masked (score -inf, value 0). At m = 4 (MB = 4) that is one chunk per series;
HCA's m' = 128 takes 8 - 16 chunks and keeps the tiles register-sized. Every byte of C and Z is read once from HBM
(the b slots of block i-1 a second time, normally from L2) and each entry written once, so the floor is the time to
read C and Z; the naive twin takes ~15 launches for the pool and norm (ape add, cats, softmax, product, sum, norm)
and ~8 more for RoPE (position gathers, slices, complex multiply, cat), each writing an entry- or C-sized
intermediate. A channel none of whose slots has a finite score pools to x = 0 (the naive twin gives NaN there; the
model's scores are finite, only entry 0's b slots are -inf).

Saved for the backward (SAVE, the training forward; the no-grad forward stores nothing more and computes `out` with
the same instructions): per entry and channel the pooled x before the norm and lse = max + log(den) of the slot
scores, 2 (B, n, c) fp32 (1/(2m) of C and Z together overlapping, 1/m plain), +inf where no slot is live so that
every weight e^(z - lse) is 0 there. Saving them instead of recomputing the online softmax lets the backward read
each slot once (the weights are e^(z_s - lse) directly), and x is needed in full before any slot (the norm's
backward sums over c); the norm's rstd is recomputed from x (one sum over c in registers), not stored.

Backward (_compressor_pool_bwd_kernel), one program per BN entries again, for each entry with g = d out:
    g_y = RoPE^T(g)           the pairs rotated by -angle: g0 cos + g1 sin, g1 cos - g0 sin (last r channels)
    xh = x rstd,  d weight += g_y xh  (this program's sum over its entries, one row of a (programs, BC) buffer)
    g_x = rstd (g_y w - xh mean_c(g_y w xh))
    per slot s: p_s = e^(z_s - lse), dC_s = p_s g_x, dZ_s = p_s (C_s - x) g_x
The a slots' gradients land on block i channels [k c - c, k c), the b slots' on block i-1 channels [0, c): each
(block, channel) element of dC / dZ is written by exactly one entry, no atomics; entry n-1 zeroes its own block's b
channels (they feed no entry) and entry 0's b slots (prev or -inf) get nothing. Traffic: C and Z (and ape) read once,
dC and dZ written once, g, x, lse read once. Then in torch: d weight = the parts' sum (the buffer has a row per
program of the smallest BN config, zeroed by the autotuner before each trial), d ape = dZ summed over (B, n)
(an extra read of dZ; in-kernel partial sums would save it).
"""
from __future__ import annotations

import torch

from .._common import autotune, check_device, configs, jit, next_pow2, tl, triton


def _configs():
    return configs([triton.Config({"BN": bn}, num_warps=w) for bn, w in ((1, 2), (2, 4), (4, 4), (8, 8))],
                   triton.Config({"BN": 2}, num_warps=4))


@jit
def _online(cc, zc, mx, den, num):
    """One chunk of slots cc, zc (BN, MB, BC) into the running per-channel max, sum of e, sum of e C (BN, BC)."""
    new = tl.maximum(mx, tl.max(zc, 1))
    sh = tl.where(new == float("-inf"), 0.0, new)                        # all slots so far -inf: shift by 0
    alpha = tl.exp(mx - sh)                                              # 0 while mx = -inf (den, num are 0)
    e = tl.exp(zc - sh[:, None, :])                                      # exp(-inf) = 0: masked slots drop out
    return new, den * alpha + tl.sum(e, 1), num * alpha + tl.sum(e * cc, 1)


@jit
def _block_rows(b, blk, sb, sn, ch):
    """Offsets (BN, 1, BC) of channels ch in block blk of sequence b (entry-major rows of C or Z)."""
    return (b * sb + blk * sn)[:, None, None] + ch[None, None, :]


@jit
def _slots(Cp, Zp, APE, c0, z0, rho, ch, A: tl.constexpr, mask, sm, scm, szm, KC: tl.constexpr,
           HAS_APE: tl.constexpr):
    """Values and scores (+ ape) of a chunk of slots rho (MB,) on channels A + ch of the rows at offsets c0 / z0
    (BN, 1, BC): (cc, zc) (BN, MB, BC) fp32, masked slots 0 / -inf (ape only where `sm`: real slot and channel)."""
    cc = tl.load(Cp + c0 + rho[None, :, None] * scm + A, mask=mask, other=0.0).to(tl.float32)
    zc = tl.load(Zp + z0 + rho[None, :, None] * szm + A, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_APE:
        zc += tl.load(APE + rho[None, :, None] * KC + ch[None, None, :] + A, mask=sm, other=0.0).to(tl.float32)
    return cc, zc


@jit
def _rope(v, COS, SIN, pos, scos, ssin, em, SIGN: tl.constexpr, C_: tl.constexpr, R: tl.constexpr,
          BN: tl.constexpr, BC: tl.constexpr):
    """RoPE (docs §2.6) of the rows v (BN, BC) on channels [C_ - R, C_) at positions pos (BN,): the row as BC / 2
    pairs (2j, 2j + 1); pair j in the rope range reads table column j - (C_ - R) / 2, the other pairs pass through.
    SIGN = 1 rotates by +angle (o0 = v0 cos - v1 sin, o1 = v0 sin + v1 cos), SIGN = -1 by -angle (the adjoint)."""
    H: tl.constexpr = BC // 2
    v0, v1 = tl.split(tl.reshape(v, [BN, H, 2]))                         # (BN, H) channels 2j and 2j + 1
    j = tl.arange(0, H)
    tj = j - (C_ - R) // 2                                               # (H,) table column of pair j
    rot = em[:, None] & ((tj >= 0) & (j < C_ // 2))[None, :]             # (BN, H) pairs to rotate
    cs = tl.load(COS + pos[:, None] * scos + tj[None, :], mask=rot, other=1.0).to(tl.float32)
    sn = tl.load(SIN + pos[:, None] * ssin + tj[None, :], mask=rot, other=0.0).to(tl.float32) * SIGN
    o0 = tl.where(rot, v0 * cs - v1 * sn, v0)
    o1 = tl.where(rot, v0 * sn + v1 * cs, v1)
    return tl.reshape(tl.join(o0, o1), [BN, BC])                         # back to channel order


@autotune(configs=_configs(), key=["C_", "M", "MB", "OVERLAP", "HAS_PREV", "HAS_APE", "R", "SAVE"])
@jit
def _compressor_pool_kernel(Cp, Zp, APE, W, PC, PZ, COS, SIN, OUT, X, LSE, E, n, eps, first,
                            scb, scn, scm, szb, szn, szm, spcb, spcm, spzb, spzm, scos, ssin,
                            C_: tl.constexpr, KC: tl.constexpr, M: tl.constexpr, MB: tl.constexpr,
                            BC: tl.constexpr, OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr,
                            HAS_APE: tl.constexpr, R: tl.constexpr, SAVE: tl.constexpr, BN: tl.constexpr):
    A0: tl.constexpr = KC - C_                                           # first channel of the a series
    e = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)           # (BN,) entries, flat over (B, n)
    b = e // n
    i = e - b * n
    r = tl.arange(0, MB)
    ch = tl.arange(0, BC)
    em = e < E
    cm = ch < C_
    ninf = float("-inf")
    mx = tl.full([BN, BC], ninf, tl.float32)
    den = tl.zeros([BN, BC], tl.float32)
    num = tl.zeros([BN, BC], tl.float32)
    ca0, za0 = _block_rows(b, i, scb, scn, ch), _block_rows(b, i, szb, szn, ch)       # block i, channel ch
    if OVERLAP:
        # b slots: block i-1, series b (channels [0, c)); entry 0 reads prev, or scores -inf without it
        im1 = tl.maximum(i - 1, 0)
        cb0, zb0 = _block_rows(b, im1, scb, scn, ch), _block_rows(b, im1, szb, szn, ch)
        for r0 in range(0, M, MB):
            rho = r0 + r
            sm = (rho < M)[None, :, None] & cm[None, None, :]            # (1, MB, BC) real slot and channel
            mb = sm & (em & (i > 0))[:, None, None]
            cc, zc = _slots(Cp, Zp, APE, cb0, zb0, rho, ch, 0, mb, sm, scm, szm, KC, HAS_APE)
            if HAS_PREV:
                m0 = sm & (em & (i == 0))[:, None, None]
                pc = tl.load(PC + (b * spcb)[:, None, None] + rho[None, :, None] * spcm + ch[None, None, :],
                             mask=m0, other=0.0).to(tl.float32)
                pz = tl.load(PZ + (b * spzb)[:, None, None] + rho[None, :, None] * spzm + ch[None, None, :],
                             mask=m0, other=ninf).to(tl.float32)
                cc = tl.where(m0, pc, cc)
                zc = tl.where(m0, pz, zc)                                # prev_Z includes ape already
            mx, den, num = _online(cc, zc, mx, den, num)
    # a slots: block i, series a (channels [KC - c, KC))
    for r0 in range(0, M, MB):
        rho = r0 + r
        sm = (rho < M)[None, :, None] & cm[None, None, :]
        ma = sm & em[:, None, None]
        cc, zc = _slots(Cp, Zp, APE, ca0, za0, rho, ch, A0, ma, sm, scm, szm, KC, HAS_APE)
        mx, den, num = _online(cc, zc, mx, den, num)
    valid = em[:, None] & cm[None, :]                                    # (BN, BC)
    x = tl.where(valid, num / tl.where(den > 0, den, 1.0), 0.0)          # pooled entry before the norm
    if SAVE:                                                             # for the backward: x and lse (BN, c)
        tl.store(X + e[:, None] * C_ + ch[None, :], x, mask=valid)
        lse = tl.where(den > 0, mx + tl.log(tl.where(den > 0, den, 1.0)), float("inf"))   # +inf: no live slot
        tl.store(LSE + e[:, None] * C_ + ch[None, :], lse, mask=valid)
    rs = 1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / C_ + eps)                   # (BN,) RMSNorm over the c channels
    w = tl.load(W + ch, mask=cm, other=0.0).to(tl.float32)
    y = x * rs[:, None] * w[None, :]
    if R > 0:                                                            # RoPE at the block's first token
        y = _rope(y, COS, SIN, (first + i) * M, scos, ssin, em, 1, C_, R, BN, BC)
    tl.store(OUT + e[:, None] * C_ + ch[None, :], y, mask=valid)


@autotune(configs=_configs(), key=["C_", "M", "MB", "OVERLAP", "HAS_APE", "R"], reset_to_zero=["DWP"])
@jit
def _compressor_pool_bwd_kernel(Cp, Zp, APE, W, COS, SIN, X, LSE, G, DC, DZ, DWP, E, n, eps, first,
                                scb, scn, scm, szb, szn, szm, scos, ssin,
                                C_: tl.constexpr, KC: tl.constexpr, M: tl.constexpr, MB: tl.constexpr,
                                BC: tl.constexpr, OVERLAP: tl.constexpr, HAS_APE: tl.constexpr, R: tl.constexpr,
                                BN: tl.constexpr):
    A0: tl.constexpr = KC - C_                                           # first channel of the a series
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BN + tl.arange(0, BN)                         # (BN,) entries, flat over (B, n)
    b = e // n
    i = e - b * n
    r = tl.arange(0, MB)
    ch = tl.arange(0, BC)
    em = e < E
    cm = ch < C_
    valid = em[:, None] & cm[None, :]                                    # (BN, BC)
    row = e[:, None] * C_ + ch[None, :]
    x = tl.load(X + row, mask=valid, other=0.0)                          # pooled entry before the norm
    lse = tl.load(LSE + row, mask=valid, other=float("inf"))             # log sum e^z per channel (+inf: no slot)
    gy = tl.load(G + row, mask=valid, other=0.0)                         # d out
    if R > 0:                                                            # RoPE's adjoint: rotate g back
        gy = _rope(gy, COS, SIN, (first + i) * M, scos, ssin, em, -1, C_, R, BN, BC)
    # RMSNorm_w backward: y = xh w, xh = x rs; d w = sum_entries gy xh; d x = rs (gy w - xh mean_c(gy w xh))
    rs = 1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / C_ + eps)                   # (BN,) as in the forward
    xh = x * rs[:, None]
    tl.store(DWP + pid * BC + ch, tl.sum(gy * xh, 0), mask=cm)           # this program's part of d weight
    gw = gy * tl.load(W + ch, mask=cm, other=0.0).to(tl.float32)[None, :]
    gx = rs[:, None] * (gw - xh * (tl.sum(gw * xh, 1) / C_)[:, None])    # (BN, BC) d x
    # softmax pool backward, slot s of the entry: p_s = e^(z_s - lse); d C_s = p_s gx; d Z_s = p_s (C_s - x) gx
    x3 = x[:, None, :]
    gx3 = gx[:, None, :]
    lse3 = lse[:, None, :]
    ca0, za0 = _block_rows(b, i, scb, scn, ch), _block_rows(b, i, szb, szn, ch)       # block i, channel ch
    d0 = (e * (M * KC))[:, None, None] + ch[None, None, :]               # d C, d Z (B, n, M, KC) contiguous
    if OVERLAP:
        # b slots: block i-1, channels [0, c), written by entry i (entry 0's are prev's or -inf: no gradient);
        # block n-1's b channels feed no entry and are zeroed by entry n-1
        im1 = tl.maximum(i - 1, 0)
        cb0, zb0 = _block_rows(b, im1, scb, scn, ch), _block_rows(b, im1, szb, szn, ch)
        for r0 in range(0, M, MB):
            rho = r0 + r
            sm = (rho < M)[None, :, None] & cm[None, None, :]            # (1, MB, BC) real slot and channel
            mb = sm & (em & (i > 0))[:, None, None]
            cc, zc = _slots(Cp, Zp, APE, cb0, zb0, rho, ch, 0, mb, sm, scm, szm, KC, HAS_APE)
            p = tl.exp(zc - lse3)                                        # (BN, MB, BC); 0 for -inf / masked
            db = d0 - M * KC + rho[None, :, None] * KC                   # block i-1 = flat entry e - 1
            tl.store(DC + db, p * gx3, mask=mb)
            tl.store(DZ + db, p * (cc - x3) * gx3, mask=mb)
            ml = sm & (em & (i == n - 1))[:, None, None]
            zero = tl.zeros([BN, MB, BC], tl.float32)
            tl.store(DC + d0 + rho[None, :, None] * KC, zero, mask=ml)
            tl.store(DZ + d0 + rho[None, :, None] * KC, zero, mask=ml)
    # a slots: block i, channels [KC - c, KC)
    for r0 in range(0, M, MB):
        rho = r0 + r
        sm = (rho < M)[None, :, None] & cm[None, None, :]
        ma = sm & em[:, None, None]
        cc, zc = _slots(Cp, Zp, APE, ca0, za0, rho, ch, A0, ma, sm, scm, szm, KC, HAS_APE)
        p = tl.exp(zc - lse3)
        da = d0 + rho[None, :, None] * KC + A0
        tl.store(DC + da, p * gx3, mask=ma)
        tl.store(DZ + da, p * (cc - x3) * gx3, mask=ma)


def _prepare(C, Z, ape, weight, overlap, prev_C, prev_Z, mb, cos, sin, first_block):
    """Checks and kernel-ready views: fp32 C, Z, prev (innermost dim contiguous), ape / weight / tables with dense
    rows in their own dtype. Returns (C, Z, ape, weight, prev_C, prev_Z, cos, sin, c, r, MB, BC)."""
    check_device(C, Z, ape, weight, prev_C, prev_Z, cos, sin)
    B, n, m, kc = C.shape
    k = 2 if overlap else 1
    if Z.shape != C.shape or kc % k:
        raise ValueError(f"C {tuple(C.shape)} and Z {tuple(Z.shape)} must be (B, n, m, {k} c)")
    c = kc // k
    if (prev_C is None) != (prev_Z is None) or (prev_C is not None and not overlap):
        raise ValueError("prev_C and prev_Z go together, and only with overlap=True")

    # no tensor op on what is already kernel-ready: each costs the launch host time (docs/kernels.md §10)
    def f32(t):                                                          # fp32, innermost dim contiguous
        if t is None:
            return None
        t = t if t.dtype == torch.float32 else t.to(torch.float32)
        return t if t.stride(-1) == 1 else t.contiguous()

    def rows(t):                                                         # any float dtype (fp32 on load), rows dense
        return t if t is None or t.is_contiguous() else t.contiguous()

    C, Z, prev_C, prev_Z = f32(C), f32(Z), f32(prev_C), f32(prev_Z)
    ape, weight = rows(ape), rows(weight)
    if ape is not None and ape.shape != (m, kc):
        raise ValueError(f"ape {tuple(ape.shape)} must be ({m}, {kc})")
    if weight.shape != (c,):
        raise ValueError(f"weight {tuple(weight.shape)} must be ({c},)")
    if prev_C is not None and (prev_C.shape != (B, m, c) or prev_Z.shape != (B, m, c)):
        raise ValueError(f"prev_C / prev_Z must be ({B}, {m}, {c})")
    r = 0
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together")
    if cos is not None:
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
        r = 2 * cos.shape[-1]
        if cos.dim() != 2 or sin.shape != cos.shape or r > c or (c - r) % 2:
            raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be (max_len, r/2) with r <= c "
                             f"= {c} and c - r even")
        if first_block < 0 or (n and (first_block + n - 1) * m >= cos.shape[0]):
            raise ValueError(f"positions up to {(first_block + n - 1) * m} (first_block {first_block}) must lie in "
                             f"the tables' {cos.shape[0]} rows")
    BC = next_pow2(c)
    MB = min(next_pow2(m), max(1, 2048 // BC)) if mb is None else int(mb)
    if MB & (MB - 1):
        raise ValueError(f"mb={mb} must be a power of two")
    return C, Z, ape, weight, prev_C, prev_Z, cos, sin, c, r, MB, BC


def _pool_fwd(C, Z, ape, weight, eps, overlap, prev_C, prev_Z, cos, sin, first_block, c, r, MB, BC, save):
    """One launch of _compressor_pool_kernel on _prepare's views -> out (B, n, c) fp32, and with save the
    backward's x, lse (B, n, c) fp32 (else None, None)."""
    B, n, m, kc = C.shape
    out = torch.empty(B, n, c, device=C.device, dtype=torch.float32)
    x = torch.empty_like(out) if save else None
    lse = torch.empty_like(out) if save else None
    E = B * n
    if E == 0:
        return out, x, lse
    pc = prev_C if prev_C is not None else C                             # dummies, never read without HAS_PREV
    pz = prev_Z if prev_Z is not None else Z
    tc = cos if r else C                                                 # dummies, never read with R = 0
    ts = sin if r else C
    grid = lambda meta: (triton.cdiv(E, meta["BN"]),)                    # noqa: E731
    _compressor_pool_kernel[grid](C, Z, ape if ape is not None else Z, weight, pc, pz, tc, ts, out,
                                  x if save else out, lse if save else out, E, n, float(eps), int(first_block),
                                  *C.stride()[:3], *Z.stride()[:3], *pc.stride()[:2], *pz.stride()[:2],
                                  tc.stride(0), ts.stride(0),                   # one stride() call per tensor
                                  C_=c, KC=kc, M=m, MB=MB, BC=BC, OVERLAP=bool(overlap),
                                  HAS_PREV=prev_C is not None, HAS_APE=ape is not None, R=r, SAVE=bool(save))
    return out, x, lse


def _pool_bwd(g, C, Z, ape, weight, eps, overlap, cos, sin, first_block, x, lse, c, r, MB, BC):
    """g (B, n, c) -> d C, d Z (B, n, m, k c) fp32 and d weight (c,) fp32 (module docstring)."""
    B, n, m, kc = C.shape
    E = B * n
    dC = torch.empty(B, n, m, kc, device=C.device, dtype=torch.float32)
    dZ = torch.empty_like(dC)
    BN_MIN = 1                                                           # smallest BN of _configs(): most programs
    dwp = torch.zeros(triton.cdiv(E, BN_MIN), BC, device=C.device, dtype=torch.float32)
    g = g.to(torch.float32).contiguous()
    tc = cos if r else C
    ts = sin if r else C
    grid = lambda meta: (triton.cdiv(E, meta["BN"]),)                    # noqa: E731
    _compressor_pool_bwd_kernel[grid](C, Z, ape if ape is not None else Z, weight, tc, ts, x, lse, g, dC, dZ, dwp,
                                      E, n, float(eps), int(first_block),
                                      C.stride(0), C.stride(1), C.stride(2), Z.stride(0), Z.stride(1), Z.stride(2),
                                      tc.stride(0), ts.stride(0),
                                      C_=c, KC=kc, M=m, MB=MB, BC=BC, OVERLAP=bool(overlap),
                                      HAS_APE=ape is not None, R=r)
    return dC, dZ, dwp[:, :c].sum(0)


class CompressorPoolFn(torch.autograd.Function):
    """Autograd of the fused pool: forward = _compressor_pool_kernel with SAVE (x, lse), backward =
    _compressor_pool_bwd_kernel + two torch sums (d weight over the programs' parts, d ape over (B, n))."""

    @staticmethod
    def forward(ctx, C, Z, ape, weight, prev_C, prev_Z, cos, sin, eps, overlap, mb, first_block):
        prep = _prepare(C, Z, ape, weight, overlap, prev_C, prev_Z, mb, cos, sin, first_block)
        Cf, Zf, apef, wf, pc, pz, cf, sf, c, r, MB, BC = prep
        out, x, lse = _pool_fwd(Cf, Zf, apef, wf, eps, overlap, pc, pz, cf, sf, first_block, c, r, MB, BC, True)
        ctx.save_for_backward(Cf, Zf, apef, wf, cf, sf, x, lse)
        ctx.cfg = (eps, overlap, first_block, c, r, MB, BC)
        ctx.dtypes = (C.dtype, Z.dtype, None if ape is None else ape.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        Cf, Zf, apef, wf, cf, sf, x, lse = ctx.saved_tensors
        eps, overlap, first_block, c, r, MB, BC = ctx.cfg
        tC, tZ, tape, tw = ctx.dtypes
        dC, dZ, dw = _pool_bwd(g, Cf, Zf, apef, wf, eps, overlap, cf, sf, first_block, x, lse, c, r, MB, BC)
        dape = dZ.sum((0, 1)).to(tape) if apef is not None and ctx.needs_input_grad[2] else None
        return (dC.to(tC), dZ.to(tZ), dape, dw.to(tw), None, None, None, None, None, None, None, None)


def compressor_pool_triton(C: torch.Tensor, Z: torch.Tensor, ape: torch.Tensor | None, weight: torch.Tensor,
                           eps: float, overlap: bool, prev_C: torch.Tensor | None = None,
                           prev_Z: torch.Tensor | None = None, mb: int | None = None, cos: torch.Tensor | None = None,
                           sin: torch.Tensor | None = None, first_block: int = 0) -> torch.Tensor:
    """(B, n, m, k c) fp32 C, Z -> (B, n, c) fp32 entries (module docstring). When grad mode is on and C, Z, ape or
    weight requires grad, through CompressorPoolFn (gradients for those four; prev_C, prev_Z, cos, sin must not
    require grad); else one plain launch of the forward kernel, no graph.
    mb: slots per chunk (a power of two; default min(pow2(m), 2048 / pow2(c)), one chunk per series at m = 4).
    cos, sin (max_len, r/2) or None: RoPE of entry i at position (first_block + i) m on its last r channels."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (C, Z, ape, weight)):
        if any(t is not None and t.requires_grad for t in (prev_C, prev_Z, cos, sin)):
            raise ValueError("compressor_pool_triton differentiates C, Z, ape and weight only: prev_C, prev_Z, cos "
                             "and sin must not require grad (detach them, or use the naive twin)")
        return CompressorPoolFn.apply(C, Z, ape, weight, prev_C, prev_Z, cos, sin, float(eps), bool(overlap), mb,
                                      int(first_block))
    prep = _prepare(C, Z, ape, weight, overlap, prev_C, prev_Z, mb, cos, sin, first_block)
    Cf, Zf, apef, wf, pc, pz, cf, sf, c, r, MB, BC = prep
    return _pool_fwd(Cf, Zf, apef, wf, eps, overlap, pc, pz, cf, sf, first_block, c, r, MB, BC, False)[0]


__all__ = ["compressor_pool_triton", "CompressorPoolFn"]
