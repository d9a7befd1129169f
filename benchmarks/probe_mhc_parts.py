"""Where the mHC pre kernel's time goes (kernels/mhc/triton.py `_mhc_pre_kernel`): the same kernel timed with parts of
its work switched off through its own arguments, at one launch config, on bf16 streams (T 65 536, n 4).

    fused_i20   the kernel as the library runs it (Sinkhorn of 20 iterations, u in the L2-hot second pass)
    fused_i1    the same with ITERS 1 (softmax + one column normalisation: the 19 row / column rounds left out)
    pass1_i20   MIX off: pass 1 (x streamed once, the projections and sum of squares) and the epilogue, no pass 2
    pass1_i1    MIX off and ITERS 1

Differences read as the parts' shares of the launch: Sinkhorn rounds = fused_i20 - fused_i1, pass 2 = fused_i20 -
pass1_i20; at two widths d (384, 1024) the pass-1 time splits into a per-byte and a per-token-block part
(docs/kernels.md §4). A probe: the ITERS 1 launches compute other coefficients than the model's (timing only).

    python benchmarks/probe_mhc_parts.py [--config BT,BC,CPS,WARPS] [--out benchmarks/results/mhc_parts.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, env_info, write_json  # noqa: E402
from dsv4_lab.kernels._common import next_pow2, triton  # noqa: E402
from dsv4_lab.kernels.mhc import triton as mt  # noqa: E402

T, N = 65536, 4


def _config(spec: str):
    """The autotune-list config named BT,BC,CPS,WARPS (bad names: one line, exit 2)."""
    try:
        bt, bc, cps, warps = (int(v) for v in spec.split(","))
    except ValueError:
        print(f"probe_mhc_parts: --config {spec!r}; allowed: BT,BC,CPS,WARPS integers, e.g. 64,128,2,4",
              file=sys.stderr)
        raise SystemExit(2)
    for cfg in mt._mhc_pre_kernel.configs:
        if (cfg.kwargs["BT"], cfg.kwargs["BC"], cfg.kwargs["CPS"], cfg.num_warps) == (bt, bc, cps, warps):
            return cfg
    listed = ", ".join("{BT},{BC},{CPS},".format(**c.kwargs) + str(c.num_warps) for c in mt._mhc_pre_kernel.configs)
    print(f"probe_mhc_parts: --config {spec!r} is not in the autotune list; allowed: {listed}", file=sys.stderr)
    raise SystemExit(2)


def parts(d: int, cfg) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, T, N, d, device="cuda", generator=g).bfloat16()
    G = 2 + N
    fn = torch.randn(G * N, N * d, device="cuda", generator=g) * (N * d) ** -0.5
    scale = torch.ones(3, device="cuda")
    base = torch.zeros(G * N, device="cuda")
    split, emul = mt._split_mode(x, "auto")
    NP = max(4, next_pow2(N))
    wh, wl = mt._split_w(fn, N, d, NP, split)
    u = torch.empty(1, T, d, device="cuda", dtype=x.dtype)
    coef = torch.empty(1, T, G * N, device="cuda")
    kw = cfg.all_kwargs()
    grid = (min(triton.cdiv(T, kw["BT"]), kw["CPS"] * mt._sm_count(x.device)),)

    def launch(iters, mix):
        mt._mhc_pre_kernel.fn[grid](x, fn, wh, wl, scale, base, u, coef, coef, coef, T, 1e-6, 1e-6, N=N, D=d, NP=NP,
                                    ITERS=iters, SPLIT=split, EMUL=emul, MIX=mix, SAVE=False, **kw)
    out = {"d": d, "bytes_x": T * N * d * 2}
    for tag, iters, mix in (("fused_i20", 20, True), ("fused_i1", 1, True), ("pass1_i20", 20, False),
                            ("pass1_i1", 1, False)):
        out[tag] = bench(lambda iters=iters, mix=mix: launch(iters, mix), warmup=10, rep=100)
    out["sinkhorn_rounds_ms"] = out["fused_i20"]["ms"] - out["fused_i1"]["ms"]
    out["pass2_ms"] = out["fused_i20"]["ms"] - out["pass1_i20"]["ms"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="64,128,2,4", help="BT,BC,CPS,WARPS of an autotune-list config")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "mhc_parts.json"))
    a = ap.parse_args()
    cfg = _config(a.config)
    if not torch.cuda.is_available():
        print("probe_mhc_parts: needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    res = {"env": env_info(), "T": T, "n": N, "config": str(cfg), "runs": [parts(d, cfg) for d in (384, 1024)]}
    r0, r1 = res["runs"]
    # pass 1 alone (MIX off, 20 iterations) as a + b x bytes: b the per-byte cost, a the per-token-block part
    b = (r1["pass1_i20"]["ms"] - r0["pass1_i20"]["ms"]) / (r1["bytes_x"] - r0["bytes_x"])
    res["pass1_fixed_ms"] = r0["pass1_i20"]["ms"] - b * r0["bytes_x"]
    res["pass1_x_tb_s"] = 1e-9 / b if b > 0 else None                   # None: d 1024 was not slower (noise)
    print(write_json(a.out, res))


if __name__ == "__main__":
    main()
