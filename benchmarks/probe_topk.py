"""Probe (T5): how much of torch.topk's time over the indexer's score rows is the final sort of the k picks, and what
bf16 scores would save. Rows shaped like one query chunk of CSA prefill at 128K (S = 32768 compressed entries,
causal: row t sees (t0 + t) / 4 entries, the rest -inf) and the 1M decode row (262144 entries); k = 512.

    python benchmarks/probe_topk.py        # writes benchmarks/results/topk_probe.json

The sparse kernels do not need the picks in order, so `sorted=False` is usable if it pays."""
from __future__ import annotations

import torch

from common import bench, bench_graph, save

K = 512


def rows(R, L, t0, dtype):
    g = torch.Generator(device="cuda").manual_seed(R + L)
    x = torch.randn(R, L, generator=g, device="cuda")
    vis = (t0 + torch.arange(R, device="cuda")[:, None]) // 4
    return x.masked_fill(torch.arange(L, device="cuda")[None, :] >= vis, float("-inf")).to(dtype)


def main(out_dir=None):
    res = {"k": K, "runs": {}}
    # prefill: 8192 queries at the end of a 128K sequence (each sees ~30-32K entries) and at 64K (16K entries)
    for name, (R, L, t0) in {"prefill_128k_tail": (8192, 32768, 131072 - 8192),
                             "prefill_64k_tail": (8192, 16384, 65536 - 8192)}.items():
        for dt in (torch.float32, torch.bfloat16):
            x = rows(R, L, t0, dt)
            for srt in (True, False):
                key = f"{name}_{str(dt)[6:]}_{'sorted' if srt else 'unsorted'}"
                r = bench(lambda: torch.topk(x, K, dim=-1, sorted=srt))
                v1 = torch.topk(x, K, dim=-1, sorted=srt).values.float().sort(-1).values
                r["same_set_as_sorted"] = bool(torch.equal(v1, torch.topk(x, K, dim=-1).values.float().sort(-1).values))
                r["GB_read"] = x.numel() * x.element_size() / 1e9
                r["tb_s"] = r["GB_read"] / 1e3 / (r["ms"] * 1e-3)
                res["runs"][key] = r
                print("topk", key, r, flush=True)
            del x
    for dt in (torch.float32, torch.bfloat16):                       # decode row at 1M context (CUDA-graph replay)
        x = rows(1, 262144, 1 << 20, dt)
        for srt in (True, False):
            key = f"decode_1m_{str(dt)[6:]}_{'sorted' if srt else 'unsorted'}"
            res["runs"][key] = {"us": bench_graph(lambda: torch.topk(x, K, dim=-1, sorted=srt))["ms"] * 1e3}
            print("topk", key, res["runs"][key], flush=True)
    save("topk_probe", res, out_dir)
    return res


if __name__ == "__main__":
    main()
