"""mHC pre + post (T8): fused Triton kernels vs the eager naive twin; bandwidth vs the copy ceiling.

Compulsory bytes per token (docs/kernels.md §4 cost model, 28 d per site for bf16 streams, plus the fp32 coef):
pre reads n d x + writes d u (+ (2 + n) n fp32 coef); post reads n d x + d y (+ coef) and writes n d x'.
Re-reads (the pre kernel's L2-hot second pass over x, the W chunks every token block reads) are not counted.
`pre_triton` times the library call (the small W hi/lo split launch included). The pre kernel is autotuned on its
first call per (n, d, dtype); `pre_autotune` records every config's median ms from that tuning and the winner.
Both ways of forming u are timed (`modes`: "fused" = the pre kernel's L2-hot second pass, "split" = a second launch);
the headline pre / fused numbers are the faster mode's (`best_mix`), which mhc/triton.py's PRE_MIX should name
(`library_default_mix` records what it named during the run).
Keys read by run_all.py: runs[*].d, runs[*].fused_fraction_of_copy_bw."""
from __future__ import annotations

import torch

from common import bench, ceilings, safe, save
from dsv4_lab.kernels.mhc.naive import mhc_post_naive, mhc_pre_naive
from dsv4_lab.kernels.mhc.triton import PRE_MIX, _mhc_pre_kernel, mhc_post_fwd, mhc_pre_fwd


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def one(T, n, d):
    x = torch.randn(1, T, n, d, device="cuda", dtype=torch.bfloat16)
    fn = torch.randn((2 + n) * n, n * d, device="cuda") * 0.02
    sc = torch.tensor([0.5, 0.7, 0.9], device="cuda")
    base = torch.randn(fn.shape[0], device="cuda")
    y = torch.randn(1, T, d, device="cuda", dtype=torch.bfloat16)
    G = fn.shape[0]
    pre_b = T * (n * d * 2 + d * 2 + G * 4)
    post_b = T * (2 * n * d * 2 + d * 2 + G * 4)
    cbw = ceilings()["copy_tb_s"]
    r = {"T": T, "n": n, "d": d, "bytes_per_token": {"pre": pre_b // T, "post": post_b // T}, "modes": {}}
    un, cn = mhc_pre_naive(x, fn, sc, base)
    for mix in ("fused", "split"):                 # how u is formed (mhc/triton.py docstring); PRE_MIX = the winner
        m = r["modes"][mix] = {}
        u, coef = mhc_pre_fwd(x, fn, sc, base, mix=mix)       # first call per mode: autotunes the pre kernel
        try:
            m["pre_autotune"] = {"best": str(_mhc_pre_kernel.best_config),
                                 "ms": {str(k): (v[0] if isinstance(v, (list, tuple)) else v)
                                        for k, v in getattr(_mhc_pre_kernel, "configs_timings", {}).items()}}
        except Exception as e:                                        # noqa: BLE001
            m["pre_autotune"] = {"error": f"{type(e).__name__}: {e}"}
        # correctness gate (docs/kernels.md §9.1 item 6): vs the naive twin on the same bf16 inputs (fp32 compute)
        m["u_rel_err_vs_naive"], m["coef_rel_err_vs_naive"] = _rel(u, un), _rel(coef, cn)
        assert m["coef_rel_err_vs_naive"] < 1e-4 and m["u_rel_err_vs_naive"] < 1e-2, f"mHC mismatch: {m}"
        p = bench(lambda: mhc_pre_fwd(x, fn, sc, base, mix=mix))
        m["pre_triton"] = dict(p, tb_s=pre_b / (p["ms"] * 1e-3) / 1e12)
    del un, cn
    best = min(r["modes"], key=lambda k: r["modes"][k]["pre_triton"]["ms"])
    r["best_mix"], r["library_default_mix"] = best, PRE_MIX
    r.update({k: r["modes"][best][k] for k in ("pre_autotune", "u_rel_err_vs_naive", "coef_rel_err_vs_naive")})
    r["post_rel_err_vs_naive"] = _rel(mhc_post_fwd(y, x, coef), mhc_post_naive(y, x, coef))
    p = r["modes"][best]["pre_triton"]
    q = bench(lambda: mhc_post_fwd(y, x, coef))
    r["pre_triton"] = p
    r["post_triton"] = dict(q, tb_s=post_b / (q["ms"] * 1e-3) / 1e12)
    tot = (pre_b + post_b) / ((p["ms"] + q["ms"]) * 1e-3) / 1e12
    r["fused_tb_s"] = tot
    r["fused_fraction_of_copy_bw"] = tot / cbw
    r["pre_fraction_of_copy_bw"] = r["pre_triton"]["tb_s"] / cbw
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
