"""Adds HCA fwd+bwd and the FlexAttention baseline to an existing benchmarks/results/hca.json (run 3 used it when
the old create_block_mask-based Flex baseline did not finish compiling; bench_hca.py now does both itself, Flex
through flex_hca.py with a per-shape time cap)."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_hca as h  # noqa: E402
from common import RESULTS, safe, save  # noqa: E402

out = os.environ.get("OUT")
res = json.load(open(os.path.join(RESULTS, "hca.json")))
res = {k: v for k, v in res.items() if k not in ("env", "ceilings")}
for N in (8192, 32768):
    res["fwd_bwd"][f"triton_{N}"] = safe(h.ours_fwd_bwd, N)
    print("bwd", N, res["fwd_bwd"][f"triton_{N}"], flush=True)
    save("hca", res, out)
for N in (8192, 32768, 131072):
    t0 = time.time()
    res["prefill"][f"flex_{N}"] = safe(h.flex_fwd, N)
    print("flex", N, res["prefill"][f"flex_{N}"], f"{time.time() - t0:.1f} s", flush=True)
    save("hca", res, out)
