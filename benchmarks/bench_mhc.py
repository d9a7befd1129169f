"""mHC pre + post (T8): fused Triton kernels vs the eager naive twin; bandwidth vs the copy ceiling.
Compulsory bytes per token: pre reads n d x + writes d u (+ 24 fp32 coef); post reads n d x + d y (+ coef) and writes
n d x'. bf16 streams."""
from __future__ import annotations

import torch

from common import bench, ceilings, safe, save
from dsv4_lab.kernels.mhc.naive import mhc_post_naive, mhc_pre_naive
from dsv4_lab.kernels.mhc.triton import mhc_post_fwd, mhc_pre_fwd


def one(T, n, d):
    x = torch.randn(1, T, n, d, device="cuda", dtype=torch.bfloat16)
    fn = torch.randn(24 if n == 4 else (2 + n) * n, n * d, device="cuda") * 0.02
    sc = torch.tensor([0.5, 0.7, 0.9], device="cuda")
    base = torch.randn(fn.shape[0], device="cuda")
    y = torch.randn(1, T, d, device="cuda", dtype=torch.bfloat16)
    u, coef = mhc_pre_fwd(x, fn, sc, base)
    G = fn.shape[0]
    pre_b = T * (n * d * 2 + d * 2 + G * 4)
    post_b = T * (2 * n * d * 2 + d * 2 + G * 4)
    cbw = ceilings()["copy_tb_s"]
    r = {"T": T, "n": n, "d": d}
    p = bench(lambda: mhc_pre_fwd(x, fn, sc, base))
    q = bench(lambda: mhc_post_fwd(y, x, coef))
    r["pre_triton"] = dict(p, tb_s=pre_b / (p["ms"] * 1e-3) / 1e12)
    r["post_triton"] = dict(q, tb_s=post_b / (q["ms"] * 1e-3) / 1e12)
    tot = (pre_b + post_b) / ((p["ms"] + q["ms"]) * 1e-3) / 1e12
    r["fused_tb_s"] = tot
    r["fused_fraction_of_copy_bw"] = tot / cbw
    pn = bench(lambda: mhc_pre_naive(x, fn, sc, base), warmup=3, rep=50)
    qn = bench(lambda: mhc_post_naive(y, x, coef), warmup=3, rep=50)
    r["pre_naive"], r["post_naive"] = pn, qn
    r["speedup_vs_naive"] = (pn["ms"] + qn["ms"]) / (p["ms"] + q["ms"])
    return r


def main(out_dir=None):
    res = {"runs": [safe(one, 65536, 4, 1024), safe(one, 65536, 4, 384)]}
    print("mhc", res, flush=True)
    save("mhc", res, out_dir)
    return res


if __name__ == "__main__":
    main()
