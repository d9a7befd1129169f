"""Dense causal MQA baselines (docs/kernels.md §9.1 item 4): SDPA FLASH_ATTENTION (= FA2) and CUDNN_ATTENTION,
16 query heads x d 128, one KV head (enable_gqa), bf16, B = 1; prefill at N and decode (1 query over N keys)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import bench, bench_graph, safe, save

H, D = 16, 128


def _sdpa(q, k, backend, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, k, is_causal=causal, enable_gqa=True)


def prefill(N, backend):
    q = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, N, D, device="cuda", dtype=torch.bfloat16)
    r = bench(lambda: _sdpa(q, k, backend, True), warmup=5, rep=60 if N <= 32768 else 800)
    flops = 2 * H * D * N * N                                       # causal: 4 H d per pair x N^2 / 2 pairs
    r.update(tflops=flops / (r["ms"] * 1e-3) / 1e12, useful_gflop=flops / 1e9)
    return r


def decode(N, backend):
    q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, N, D, device="cuda", dtype=torch.bfloat16)
    r = bench_graph(lambda: _sdpa(q, k, backend, False))
    r["us"] = r["ms"] * 1e3
    r["tb_s"] = 2 * N * D * 2 / (r["ms"] * 1e-3) / 1e12                # K and V read (same tensor, counted twice)
    return r


def main(out_dir=None, Ns=(8192, 32768, 131072), decode_Ns=(131072, 1048576)):
    res = {"shapes": {"H": H, "D": D, "B": 1, "dtype": "bf16", "kv_heads": 1}, "prefill": {}, "decode": {}}
    for N in Ns:
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            res["prefill"][f"{name}_{N}"] = safe(prefill, N, be)
            print("dense", name, N, res["prefill"][f"{name}_{N}"], flush=True)
            torch.cuda.empty_cache()
    for N in decode_Ns:
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            res["decode"][f"{name}_{N}"] = safe(decode, N, be)
            print("dense decode", name, N, res["decode"][f"{name}_{N}"], flush=True)
    save("dense", res, out_dir)
    return res


if __name__ == "__main__":
    main()
