# radix_select on one 256K-entry row (k 512): programs x block x warps, CUDA-graph replay; values vs torch.topk
import json, sys, itertools, torch
sys.path.insert(0, "benchmarks")
from common import bench_graph
from dsv4_lab.kernels.indexer_topk.select import SelectWorkspace, radix_select
g = torch.Generator(device="cuda").manual_seed(5)
x = torch.randn(1, 262144, device="cuda", generator=g)
ws = SelectWorkspace(1, programs=512)
res = {}
for nm, row in (("fp32", x), ("bf16", x.bfloat16())):
    ref = torch.topk(row.float(), 512).values
    for P, blk, nw in itertools.product((128, 256, 512), (512, 1024, 2048), (4, 8, 16)):
        if 262144 // P < blk // 2:
            continue
        f = lambda: radix_select(row, 512, programs=P, workspace=ws, block=blk, num_warps=nw)
        try:
            v, _ = f()
            ok = torch.equal(torch.sort(v, -1, descending=True).values, ref)
            res[f"{nm}_p{P}_b{blk}_w{nw}"] = (round(bench_graph(f)["ms"] * 1e3, 2), ok)
        except Exception as e:
            res[f"{nm}_p{P}_b{blk}_w{nw}"] = str(e)[:100]
for k, v in sorted(res.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], tuple) else 1e9):
    print(k, v)
json.dump(res, open(sys.argv[1], "w"), indent=1)
