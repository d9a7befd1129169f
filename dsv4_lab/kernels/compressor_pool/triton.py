"""Fused compressor pool + ape + RMSNorm_w (+ RoPE) in one Triton launch, forward only (docs/kernels.md §11; docs
§2.3, §3, §2.6).

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

One program owns BN whole entries (rows of c channels, so the RMSNorm's sum over c stays in registers). It walks
the slots in chunks of MB: overlapping, first the b slots (block i-1, channels [0, c); for entry 0 the prev rows, or
-inf without them), then the a slots (block i, channels [c, 2c); plain: the block's m slots, channels [0, c)), each
chunk a [BN, MB, BC] tile of C and Z (+ ape), folded into a running per-channel max, sum of e^(z - max) and sum of
e^(z - max) C (online softmax in fp32, rescaled when the max grows). Then x = num / den, the RMSNorm with its weight,
with tables the rotation of the interleaved pairs (2j, 2j+1) (the [BN, BC] row split into its even and odd channels,
out0 = x0 cos - x1 sin, out1 = x0 sin + x1 cos, joined back), and one store of the entry. BC = pow2(c); padded slots
/ channels are masked (score -inf, value 0). At m = 4 (MB = 4) that is one chunk per series; HCA's m' = 128 takes
8 - 16 chunks and keeps the tiles register-sized. Every byte of C and Z is read once from HBM (the b slots of block
i-1 a second time, normally from L2) and each entry written once, so the floor is the time to read C and Z; the
naive twin takes ~15 launches for the pool and norm (ape add, cats, softmax, product, sum, norm) and ~8 more for RoPE
(position gathers, slices, complex multiply, cat), each writing an entry- or C-sized intermediate.
"""
from __future__ import annotations

import torch

from .._common import check_device, configs, next_pow2, tl, triton


def _configs():
    return configs([triton.Config({"BN": bn}, num_warps=w) for bn, w in ((1, 2), (2, 4), (4, 4), (8, 8))],
                   triton.Config({"BN": 2}, num_warps=4))


@triton.jit
def _online(cc, zc, mx, den, num):
    """One chunk of slots cc, zc (BN, MB, BC) into the running per-channel max, sum of e, sum of e C (BN, BC)."""
    new = tl.maximum(mx, tl.max(zc, 1))
    sh = tl.where(new == float("-inf"), 0.0, new)                        # all slots so far -inf: shift by 0
    alpha = tl.exp(mx - sh)                                              # 0 while mx = -inf (den, num are 0)
    e = tl.exp(zc - sh[:, None, :])                                      # exp(-inf) = 0: masked slots drop out
    return new, den * alpha + tl.sum(e, 1), num * alpha + tl.sum(e * cc, 1)


@triton.autotune(configs=_configs(), key=["C_", "M", "MB", "OVERLAP", "HAS_PREV", "HAS_APE", "R"])
@triton.jit
def _compressor_pool_kernel(Cp, Zp, APE, W, PC, PZ, COS, SIN, OUT, E, n, eps, first,
                            scb, scn, scm, szb, szn, szm, spcb, spcm, spzb, spzm, scos, ssin,
                            C_: tl.constexpr, KC: tl.constexpr, M: tl.constexpr, MB: tl.constexpr,
                            BC: tl.constexpr, OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr,
                            HAS_APE: tl.constexpr, R: tl.constexpr, BN: tl.constexpr):
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
    ca0 = (b * scb + i * scn)[:, None, None] + ch[None, None, :]         # block i, channel ch
    za0 = (b * szb + i * szn)[:, None, None] + ch[None, None, :]
    if OVERLAP:
        # b slots: block i-1, series b (channels [0, c)); entry 0 reads prev, or scores -inf without it
        im1 = tl.maximum(i - 1, 0)
        cb0 = (b * scb + im1 * scn)[:, None, None] + ch[None, None, :]
        zb0 = (b * szb + im1 * szn)[:, None, None] + ch[None, None, :]
        for r0 in range(0, M, MB):
            rho = r0 + r
            sm = (rho < M)[None, :, None] & cm[None, None, :]            # (1, MB, BC) real slot and channel
            mb = sm & (em & (i > 0))[:, None, None]
            cc = tl.load(Cp + cb0 + rho[None, :, None] * scm, mask=mb, other=0.0).to(tl.float32)
            zc = tl.load(Zp + zb0 + rho[None, :, None] * szm, mask=mb, other=ninf).to(tl.float32)
            if HAS_APE:
                zc += tl.load(APE + rho[None, :, None] * KC + ch[None, None, :], mask=sm, other=0.0).to(tl.float32)
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
        cc = tl.load(Cp + ca0 + rho[None, :, None] * scm + A0, mask=ma, other=0.0).to(tl.float32)
        zc = tl.load(Zp + za0 + rho[None, :, None] * szm + A0, mask=ma, other=ninf).to(tl.float32)
        if HAS_APE:
            zc += tl.load(APE + rho[None, :, None] * KC + ch[None, None, :] + A0, mask=sm, other=0.0).to(tl.float32)
        mx, den, num = _online(cc, zc, mx, den, num)
    valid = em[:, None] & cm[None, :]                                    # (BN, BC)
    x = tl.where(valid, num / tl.where(den > 0, den, 1.0), 0.0)          # pooled entry before the norm
    rs = 1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / C_ + eps)                   # (BN,) RMSNorm over the c channels
    w = tl.load(W + ch, mask=cm, other=0.0).to(tl.float32)
    y = x * rs[:, None] * w[None, :]
    if R > 0:
        # RoPE (docs §2.6) on channels [C_ - R, C_) at position (first + i) M: the row as BC / 2 pairs (2j, 2j + 1);
        # pair j in the rope range reads table column j - (C_ - R) / 2; the other pairs pass through untouched
        H: tl.constexpr = BC // 2
        y0, y1 = tl.split(tl.reshape(y, [BN, H, 2]))                     # (BN, H) channels 2j and 2j + 1
        j = tl.arange(0, H)
        tj = j - (C_ - R) // 2                                           # (H,) table column of pair j
        rot = em[:, None] & ((tj >= 0) & (j < C_ // 2))[None, :]         # (BN, H) pairs to rotate
        pos = (first + i) * M                                            # (BN,) the block's first token
        cs = tl.load(COS + pos[:, None] * scos + tj[None, :], mask=rot, other=1.0).to(tl.float32)
        sn = tl.load(SIN + pos[:, None] * ssin + tj[None, :], mask=rot, other=0.0).to(tl.float32)
        o0 = tl.where(rot, y0 * cs - y1 * sn, y0)
        o1 = tl.where(rot, y0 * sn + y1 * cs, y1)
        y = tl.reshape(tl.join(o0, o1), [BN, BC])                        # back to channel order
    tl.store(OUT + e[:, None] * C_ + ch[None, :], y, mask=valid)


def compressor_pool_triton(C: torch.Tensor, Z: torch.Tensor, ape: torch.Tensor | None, weight: torch.Tensor,
                           eps: float, overlap: bool, prev_C: torch.Tensor | None = None,
                           prev_Z: torch.Tensor | None = None, mb: int | None = None, cos: torch.Tensor | None = None,
                           sin: torch.Tensor | None = None, first_block: int = 0) -> torch.Tensor:
    """Forward only (no autograd graph): (B, n, m, k c) fp32 C, Z -> (B, n, c) fp32 entries (module docstring).
    mb: slots per chunk (a power of two; default min(pow2(m), 2048 / pow2(c)), one chunk per series at m = 4).
    cos, sin (max_len, r/2) or None: RoPE of entry i at position (first_block + i) m on its last r channels."""
    check_device(C, Z, ape, weight, prev_C, prev_Z, cos, sin)
    B, n, m, kc = C.shape
    k = 2 if overlap else 1
    if Z.shape != C.shape or kc % k:
        raise ValueError(f"C {tuple(C.shape)} and Z {tuple(Z.shape)} must be (B, n, m, {k} c)")
    c = kc // k
    if (prev_C is None) != (prev_Z is None) or (prev_C is not None and not overlap):
        raise ValueError("prev_C and prev_Z go together, and only with overlap=True")

    def f32(t):                                                          # fp32, innermost dim contiguous
        if t is None:
            return None
        t = t.detach().to(torch.float32)
        return t if t.stride(-1) == 1 else t.contiguous()

    def rows(t):                                                         # any float dtype (fp32 on load), rows dense
        return None if t is None else t.detach().contiguous()

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
        cos, sin = cos.detach(), sin.detach()
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
        r = 2 * cos.shape[-1]
        if cos.dim() != 2 or sin.shape != cos.shape or r > c or (c - r) % 2:
            raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be (max_len, r/2) with r <= c "
                             f"= {c} and c - r even")
        if first_block < 0 or (n and (first_block + n - 1) * m >= cos.shape[0]):
            raise ValueError(f"positions up to {(first_block + n - 1) * m} (first_block {first_block}) must lie in "
                             f"the tables' {cos.shape[0]} rows")
    out = torch.empty(B, n, c, device=C.device, dtype=torch.float32)
    E = B * n
    if E == 0:
        return out
    pc = prev_C if prev_C is not None else C                             # dummies, never read without HAS_PREV
    pz = prev_Z if prev_Z is not None else Z
    tc = cos if r else C                                                 # dummies, never read with R = 0
    ts = sin if r else C
    BC = next_pow2(c)
    MB = min(next_pow2(m), max(1, 2048 // BC)) if mb is None else int(mb)
    if MB & (MB - 1):
        raise ValueError(f"mb={mb} must be a power of two")
    grid = lambda meta: (triton.cdiv(E, meta["BN"]),)                    # noqa: E731
    _compressor_pool_kernel[grid](C, Z, ape if ape is not None else Z, weight, pc, pz, tc, ts, out, E, n, float(eps),
                                  int(first_block),
                                  C.stride(0), C.stride(1), C.stride(2), Z.stride(0), Z.stride(1), Z.stride(2),
                                  pc.stride(0), pc.stride(1), pz.stride(0), pz.stride(1), tc.stride(0), ts.stride(0),
                                  C_=c, KC=kc, M=m, MB=MB, BC=BC, OVERLAP=bool(overlap),
                                  HAS_PREV=prev_C is not None, HAS_APE=ape is not None, R=r)
    return out


__all__ = ["compressor_pool_triton"]
