"""FP8 / MXFP4 fake quantisation (T10): Triton vs dsv4_lab.quant's reference (eager and torch.compile);
bf16 -> bf16, bytes = read + write of every element.

`triton` is the library's default path (1-D blocks: the contiguous-groups kernel, 8192 elements and 8 warps per
program; tile=True: the 2-D tile kernel). For 1-D blocks `variants` times, in the same run, the previous per-row
kernel (`rows`) and other groups configs; every variant is checked bit-exact before it is timed.
Keys read by run_all.py: runs[*].fmt, runs[*].tile, runs[*].triton.tb_s."""
from __future__ import annotations

import torch

from common import bench, ceilings, safe, save
from dsv4_lab.kernels.fake_quant.triton import fake_quant_triton
from dsv4_lab.quant import fake_quant_fp8_ref, fake_quant_fp8_weight_ref, fake_quant_mxfp4_ref

VARIANTS = {"rows": dict(variant="rows"), "groups_epp4096_w4": dict(epp=4096, num_warps=4),
            "groups_epp16384_w8": dict(epp=16384, num_warps=8)}


def one(fmt, block, tile, n=16384):
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ref = {("fp8", False): lambda t: fake_quant_fp8_ref(t, block), ("fp4", False): fake_quant_mxfp4_ref,
           ("fp8", True): lambda t: fake_quant_fp8_weight_ref(t, block)}[(fmt, tile)]
    want = ref(x).view(torch.int16)
    b = 2 * x.numel() * 2
    cbw = ceilings()["copy_tb_s"]

    def timed(**kw):
        f = lambda: fake_quant_triton(x, fmt, block, tile, **kw)  # noqa: E731
        assert torch.equal(f().view(torch.int16), want), f"not bit-exact: {fmt} {block} {tile} {kw}"
        t = bench(f)
        return dict(t, tb_s=b / (t["ms"] * 1e-3) / 1e12, fraction_of_copy=b / (t["ms"] * 1e-3) / 1e12 / cbw)

    r = {"shape": [n, n], "fmt": fmt, "block": block, "tile": tile, "bit_exact_vs_quant_ref": True}
    r["triton"] = timed()
    if not tile:
        r["triton"]["config"] = "groups, epp 8192, 8 warps"
        r["variants"] = {k: safe(timed, **kw) for k, kw in VARIANTS.items()}
    e = bench(lambda: ref(x), warmup=3, rep=50)
    r["eager_ref"] = dict(e, tb_s=b / (e["ms"] * 1e-3) / 1e12)
    c = torch.compile(ref)
    c(x)
    cc = bench(lambda: c(x))
    r["compiled_ref"] = dict(cc, tb_s=b / (cc["ms"] * 1e-3) / 1e12)
    return r


def main(out_dir=None):
    res = {"runs": [safe(one, "fp8", 128, False), safe(one, "fp4", 32, False), safe(one, "fp8", 128, True)]}
    print("fake_quant", res, flush=True)
    save("fake_quant", res, out_dir)
    return res


if __name__ == "__main__":
    main()
