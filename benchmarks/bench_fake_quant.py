"""FP8 / MXFP4 fake quantisation (T10): Triton vs dsv4_lab.quant's reference (eager and torch.compile);
bf16 -> bf16, bytes = read + write of every element."""
from __future__ import annotations

import torch

from common import bench, ceilings, safe, save
from dsv4_lab.kernels.fake_quant.triton import fake_quant_triton
from dsv4_lab.quant import fake_quant_fp8_ref, fake_quant_fp8_weight_ref, fake_quant_mxfp4_ref


def one(fmt, block, tile, n=16384):
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ref = {("fp8", False): lambda t: fake_quant_fp8_ref(t, block), ("fp4", False): fake_quant_mxfp4_ref,
           ("fp8", True): lambda t: fake_quant_fp8_weight_ref(t, block)}[(fmt, tile)]
    ours = lambda: fake_quant_triton(x, fmt, block, tile)  # noqa: E731
    assert torch.equal(ours().view(torch.int16), ref(x).view(torch.int16)), "not bit-exact"
    b = 2 * x.numel() * 2
    r = {"shape": [n, n], "fmt": fmt, "block": block, "tile": tile, "bit_exact_vs_quant_ref": True}
    t = bench(ours)
    r["triton"] = dict(t, tb_s=b / (t["ms"] * 1e-3) / 1e12, fraction_of_copy=b / (t["ms"] * 1e-3) / 1e12 /
                       ceilings()["copy_tb_s"])
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
