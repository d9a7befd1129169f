"""The indexer KL backward's dkI side by side on one GPU: fp32 atomics (the default) against the dense variant
(kernels/sparse_kl/triton.py docstring) at several buffer sizes, on the `small` preset's 16K shapes (B 4, T 16384,
S 4096, n_I 4, c_I 64, k 512; distinct random picks), with the dense path's zeroing and GEMM of one chunk timed
alone; then one eager V4 training step at 16K with each (bench_e2e.measure). Writes results/kl_bwd.json.

    python benchmarks/bench_kl_bwd.py            # H200: about one minute
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv4_lab.kernels.sparse_kl.triton as klt  # noqa: E402
from common import bench, save  # noqa: E402


def main():
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, S, NI, CI, K, H, c = 4, 16384, 4096, 4, 64, 512, 8, 128
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q, comp = torch.randn(B, T, H, c, generator=g, **bf), torch.randn(B, S, c, generator=g, **bf)
    qI, kI = torch.randn(B, T, NI, CI, generator=g, **bf), torch.randn(B, S, CI, generator=g, **bf)
    w = (torch.randn(B, T, NI, generator=g, device="cuda") * 0.06).bfloat16()
    idx = torch.rand(B, T, S, generator=g, device="cuda").topk(K, dim=-1).indices.int()   # distinct picks per row
    lse = torch.full((B, T, H), 5.0, device="cuda")
    _, st, pb = klt.sparse_kl_fwd(q, comp, idx, lse, c ** -0.5, qI, kI, w)
    dkl = st[..., 0] / st[..., 0].sum()
    ref = None
    for db in (None, 1 << 27, 1 << 29, 1 << 31):
        r = klt.sparse_kl_bwd(dkl, qI, kI, w, idx, st, pb, dense_bytes=db)
        ref = ref or [x.float() for x in r]
        out[f"dense_{db}"] = {
            "bwd_ms": bench(lambda db=db: klt.sparse_kl_bwd(dkl, qI, kI, w, idx, st, pb, dense_bytes=db),
                            warmup=2, rep=5)["ms"],
            "max_rel_diff_vs_atomics": [float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(r, ref)]}
        print("kl bwd dense_bytes", db, out[f"dense_{db}"], flush=True)
    tc = T // 8
    dl = torch.empty(B, S, tc * NI, device="cuda")
    dki = torch.zeros(B, S, CI, device="cuda")
    out["chunk_rows"] = tc
    out["chunk_zero_ms"] = bench(lambda: dl.zero_(), warmup=2, rep=5)["ms"]
    out["chunk_gemm_ms"] = bench(lambda: klt._dki_gemm[(S // 64, B)](
        dl, qI, dki, S, T, 0, tc, qI.stride(0), qI.stride(1), qI.stride(2), NI=NI, CI=CI, BLOCK_S=64, BLOCK_R=64,
        BLOCK_CI=64, PREC_G="tf32", num_warps=4), warmup=2, rep=5)["ms"]
    print("one chunk:", {k: out[k] for k in ("chunk_rows", "chunk_zero_ms", "chunk_gemm_ms")}, flush=True)
    del q, comp, qI, kI, w, idx, st, pb, dl, dki
    torch.cuda.empty_cache()
    import bench_e2e
    keep = klt.DENSE_BYTES
    try:
        for db in (None, 1 << 29):
            klt.DENSE_BYTES = db
            r = bench_e2e.measure("small", 16384, False, 3, 6, 60.0)
            out[f"e2e_16k_step_ms_dense_{db}"] = r.get("step_ms")
            print("e2e 16K eager step, KL dense_bytes", db, r.get("step_ms"), flush=True)
    finally:
        klt.DENSE_BYTES = keep
    save("kl_bwd", out)
    return out


if __name__ == "__main__":
    main()
