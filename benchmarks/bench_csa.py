"""CSA (T2-T6): compressor, indexer score kernel, every indexer + top-k method, the sparse attention kernel; CSA prefill
= compressor + best indexer method + sparse attention (summed), and `pipeline_N` the same chain timed end to end,
eager and from a CUDA graph, beside SDPA-flash timed both ways; CSA decode (CUDA-graph replay) = best indexer method
+ sparse attention, each its own replay; `csa_decode_chain_us` the library's indexer and the sparse attention as one
replay, `csa_decode_chain_in_graph_us` per layer of CHAIN_CALLS such layers captured in one graph (as a decode step's
graph runs them: one replay start for all), `graph_floor_us` a replay of one tiny kernel; `*_gpu_us` the same replay
timed from the GPU's start of it (common.bench_graph hold=True: not the host's launch latency; `csa_decode_gpu_us` the
two parts so timed); `*_pdl*` with programmatic dependent launch in the select's launches (select.py PDL, and the tail
select's, tailselect.py PDL) and, in the chain and `sparse_attn_pdl`, the attention's (sparse_attn/triton_decode.py
PDL); `*_nopdl*` with none (the library's defaults: the tail select's on, the others off). H 16, d 128, m 4, k 512, window
128, H_I 4 x d_I 64, bf16, B = 1, d_model 1024 (docs/kernels.md §8.5).

Indexer methods (dsv4_lab/kernels/indexer_topk/triton.py): torch (Triton scores per query chunk + torch.topk),
torch_bf16 (bf16 scores + torch.topk), select / select_bf16 (the split-row radix select of indexer_topk/select.py)
and rowsel / rowsel_bf16 (the one-program-per-row select of indexer_topk/rowselect.py) on fp32 / bf16 scores;
torch_topk = the naive PyTorch path (fp32 einsum scores + torch.topk; 8K/32K only). Decode also times the select
methods as one launch (_one_launch), with the score launch counting their first digit (_fused: checked to give the
unfused picks slot for slot), and both; csa_decode_us takes the form the library runs: its indexer and the sparse
attention, each the median of CAPTURES captures of its own graph (common.replays_us; the indexer timed again after
its single-capture figure chose it). The variants measured here before and removed from the package:
benchmarks/README.md ("Removed indexer top-k variants"; their numbers stay in results/csa.json).
Work: indexer 2*HI*DI FLOP per visible (query, entry) pair (docs/kernels.md §9.1); gather bandwidth counts each
loaded 256-B row once per query. bf16-score methods report their recall of the fp32-score picks (docs §2.4).

Each family (topk_row, decode_N, prefill_N, fwd_bwd) runs in its own subprocess with a time cap (FAMILY_CAP_S, env
CSA_FAMILY_CAP_S; env CSA_FAMILIES picks and orders them, merging into the saved csa.json) and its results are merged into csa.json as soon as it
ends, so a capped device call keeps what finished. SDPA-flash (dense causal MQA, as bench_dense.py) and torch.topk are measured inside the same families.
Env CSA_TRY runs the families with settings that are not yet the library's (TRY below) and writes csa_try_<...>.json."""
from __future__ import annotations

import os
import sys
import time
from unittest import mock

import torch

from common import bench, bench_graph, bench_queued, host_ms, host_stages_ms, replays_us, safe, save
from dsv4_lab.kernels.indexer_topk import select as sel
from dsv4_lab.kernels.indexer_topk import tailselect as ts
from dsv4_lab.kernels.indexer_topk import triton as itk
from dsv4_lab.kernels.indexer_topk.naive import indexer_topk_naive
from dsv4_lab.kernels.indexer_topk.triton import indexer_scores_triton, indexer_topk_triton
from dsv4_lab.kernels.sparse_attn import triton_decode as sd
from dsv4_lab.kernels.sparse_attn.naive import sparse_attn_naive
from dsv4_lab.kernels.sparse_attn.triton import sparse_attn_fwd, sparse_attn_triton

H, D, M, K, W, HI, DI, DM = 16, 128, 4, 512, 128, 4, 64, 1024
BF = dict(device="cuda", dtype=torch.bfloat16)
METHODS = ("sieve_bf16", "sieve", "rowsel_bf16", "rowsel", "select_bf16", "select", "torch_bf16", "torch")
BF16_METHODS = ("sieve_bf16", "rowsel_bf16", "select_bf16", "torch_bf16")
FAMILY_CAP_S = 150
CHAIN_CALLS = 20          # decode: CSA layers captured back to back in one graph (csa_decode_chain_in_graph_us)
CAPTURES = 3              # the summary keys' calls (the tail select's row, decode's two parts and chain): each figure
#                           the median of this many captures of its own graph (common.replays_us)


def indexer_inputs(N, T=None):
    T = N if T is None else T
    g = torch.Generator(device="cuda").manual_seed(N + T)
    qI = torch.randn(1, T, HI, DI, generator=g, **BF)
    kI = torch.randn(1, N // M, DI, generator=g, **BF)
    w = torch.randn(1, T, HI, generator=g, **BF) * (DI * HI) ** -0.5
    return qI, kI, w


def idx_pairs(N):
    t = torch.arange(N, dtype=torch.float64)
    return float(torch.clamp((t + 1) // M, max=K).sum()), float(torch.clamp(t + 1, max=W).sum()), \
        float(((t + 1) // M).sum())


def _tflops(r, N):
    allv = idx_pairs(N)[2]
    r.update(tflops=2 * HI * DI * allv / (r["ms"] * 1e-3) / 1e12, useful_gflop=2 * HI * DI * allv / 1e9)
    return r


def scores_only(N, chunk_elems=1 << 28, config=None, dtype=torch.float32):
    """The score kernel alone over all N queries, in the query chunks the top-k methods use (fill=False: as select);
    config: one score config to launch (None: the autotuner's pick); dtype: of the stored scores."""
    qI, kI, w = indexer_inputs(N)
    S = N // M
    rows = max(1, min(N, chunk_elems // S))
    buf = torch.empty(rows * S, dtype=dtype, device="cuda")

    def run():
        for t0 in range(0, N, rows):
            indexer_scores_triton(qI, kI, w, M, 0, t0, min(N, t0 + rows), out=buf, fill=False, config=config,
                                  dtype=dtype)
    r = _tflops(bench(run, warmup=3, rep=50), N)
    r["note"] = f"query chunks of {rows} rows, only each chunk's visible key range, tiles past the frontier skipped"
    return r


def score_configs(Ns=(8192, 131072)):
    """The score kernel under each config of its autotune list and of SCORE_CANDIDATE_CONFIGS (indexer_topk/
    triton.py), and tuned, over a whole prefill's query chunks with bf16 scores (as the bf16 top-k methods store
    them); each config's scores checked bitwise against the tuned ones on the first chunk."""
    out = {}
    for N in Ns:
        qI, kI, w = indexer_inputs(N)
        t1 = min(N, (1 << 28) // (N // M))
        ref = indexer_scores_triton(qI, kI, w, M, 0, 0, t1, dtype=torch.bfloat16)
        vis = torch.isfinite(ref)
        e = {"tuned": scores_only(N, dtype=torch.bfloat16)["ms"],
             "tuned_config": str(itk._indexer_scores_fwd.best_config)}
        for cfg in list(itk._indexer_scores_fwd.configs) + itk.SCORE_CANDIDATE_CONFIGS:
            tag = "BN{BLOCK_N}_L{NLOOP}".format(**cfg.kwargs) + f"_w{cfg.num_warps}_s{cfg.num_stages}"
            try:
                got = indexer_scores_triton(qI, kI, w, M, 0, 0, t1, dtype=torch.bfloat16, config=cfg)
                e[f"{tag}_same_scores"] = bool(torch.equal(got[vis], ref[vis]))
                e[f"{tag}_ms"] = scores_only(N, config=cfg, dtype=torch.bfloat16)["ms"]
            except Exception as ex:                                             # noqa: BLE001
                e[f"{tag}_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
        out[f"{N}"] = e
        torch.cuda.empty_cache()
    return out


def indexer_method(N, method):
    qI, kI, w = indexer_inputs(N)
    ws = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    r = _tflops(bench(lambda: indexer_topk_triton(qI, kI, w, K, M, method=method, workspace=ws), warmup=3, rep=50), N)
    r["method"] = method
    if N <= 32768:                                       # where the host's enqueue time can be what an eager call costs
        r["host_ms"] = safe(host_ms, lambda: indexer_topk_triton(qI, kI, w, K, M, method=method, workspace=ws))
    if method in BF16_METHODS:
        r["recall_vs_fp32"] = recall(indexer_topk_triton(qI, kI, w, K, M, method=method, workspace=ws),
                                     indexer_topk_triton(qI, kI, w, K, M, method="torch", workspace=ws))
    return r


def recall(idx, ref):
    """|picks ∩ reference picks| / |reference picks| over all rows (-1 slots excluded): (B, T, K) int32 each."""
    B, T, k = ref.shape
    S = int(max(idx.max(), ref.max())) + 2
    a = torch.zeros(B * T, S, dtype=torch.bool, device=ref.device)
    b = torch.zeros_like(a)
    rows = torch.arange(B * T, device=ref.device)[:, None]
    a[rows, idx.view(B * T, k).long().clamp_min(-1) + 1] = True
    b[rows, ref.view(B * T, k).long().clamp_min(-1) + 1] = True
    a[:, 0] = b[:, 0] = False
    return float((a & b).sum() / b.sum().clamp_min(1))


def indexer_naive(N):
    qI, kI, w = indexer_inputs(N)
    r = bench(lambda: indexer_topk_naive(qI, kI, w, K, M, chunk=2048, use_topk=True), warmup=2, rep=50)
    r["note"] = "naive fp32 einsum scores in query chunks of 2048 + torch.topk (never the full [N, N/4] matrix)"
    return r


def agreement(N):
    """Correctness gate (docs/kernels.md §9.1 item 6) on random bf16 inputs: the fp32-score select's top-k values vs
    torch (same score kernel -> identical fp32 scores; slots may differ only where equal scores swap places)."""
    qI, kI, w = indexer_inputs(N)
    i0, v0 = indexer_topk_triton(qI, kI, w, K, M, method="torch", return_scores=True)
    i1, v1 = indexer_topk_triton(qI, kI, w, K, M, method="select", return_scores=True)
    fin = torch.isfinite(v0)
    return {"select": {"values_equal": bool(torch.equal(v1, v0)),
                       "max_abs_diff": float((v1 - v0)[fin].abs().max()) if fin.any() else 0.0,
                       "index_slots_equal_frac": float((i1 == i0).float().mean())}}


def compressor(N):
    """Main (c = d = 128) + indexer (c = d_I = 64) overlapping compressors, forward, d_model 1024, bf16 input.

    `{name}_ms` / `ms`: the module as the model runs it at inference (kernels=auto on CUDA, no grad, a RotaryTable:
    the two GEMMs and the fused pool + ape + RMSNorm + RoPE kernel of kernels/compressor_pool); `{name}_torch_pool_ms`
    / `ms_torch_pool`: the same weights with impl="torch" (the PyTorch pool glue, the naive twin, then RoPE);
    `{name}_pool_fused_ms` / `_pool_torch_ms`: the pool + norm alone on precomputed projections (no GEMMs, no RoPE);
    `{name}_graph_ms`: the module replayed from a CUDA graph (its kernels without the host's launch gaps, which the
    eager `{name}_ms` includes whenever the host enqueues slower than the GPU runs); `{name}_host`: the host's
    time to enqueue one call (common.host_ms: median, min, max ms). The indexer methods and the sparse attention carry
    a `host_ms` entry too up to 32K, and `pipeline_N` a `host` / `sdpa_flash_host` one for the chain and SDPA-flash,
    and `host_stages` (common.host_stages_ms): the chain's host time per call split by stage (main compressor,
    indexer compressor, indexer top-k, sparse attention), which shows where the chain waits if a stage synchronizes.
    The table has N rows: the last entry's position, (N/4 - 1) 4, is inside it."""
    from dsv4_lab.attention.compressor import Compressor
    from dsv4_lab.kernels.compressor_pool import compressor_pool
    from dsv4_lab.rope import RotaryTable
    u = torch.randn(1, N, DM, **BF)
    out = {}
    for name, c in (("main", D), ("indexer", DI)):
        comp = Compressor(DM, c, M, overlap=True).to("cuda", torch.bfloat16)
        with torch.no_grad():                                # a non-trivial slot bias and norm weight
            comp.ape.normal_(0, 0.5)
            comp.norm.weight.normal_(1, 0.1)
        comp_t = Compressor(DM, c, M, overlap=True, impl="torch").to("cuda", torch.bfloat16)
        comp_t.load_state_dict(comp.state_dict())
        rope = RotaryTable(min(64, c), N, 10000.0).cuda()
        with torch.no_grad():
            out[f"{name}_ms"] = bench(lambda: comp(u, rope), warmup=3, rep=50)["ms"]
            out[f"{name}_graph_ms"] = bench_graph(lambda: comp(u, rope))["ms"]   # the same, no host gaps
            out[f"{name}_host"] = safe(host_ms, lambda: comp(u, rope))              # the host's enqueue time per call
            out[f"{name}_torch_pool_ms"] = bench(lambda: comp_t(u, rope), warmup=3, rep=50)["ms"]
            y_f, y_t = comp(u, rope).float(), comp_t(u, rope).float()
            out[f"{name}_fused_max_rel_diff_vs_torch_pool"] = float((y_f - y_t).abs().max() / y_t.abs().max())
            uf = u.float()                                  # fp32 input: the projections cast to fp32 (old path)
            out[f"{name}_fp32_ms"] = bench(lambda: comp(uf, rope), warmup=3, rep=50)["ms"]
            out[f"{name}_max_rel_diff_vs_fp32"] = float((comp(u, rope).float() - comp(uf, rope).float()).abs().max()
                                                        / comp(uf, rope).float().abs().max())
            n = N // M
            C, Z = comp.project(u[:, : n * M])
            C, Z = C.unflatten(1, (n, M)), Z.unflatten(1, (n, M))
            args = (C, Z, comp.ape, comp.norm.weight, comp.norm.eps, True)
            out[f"{name}_pool_fused_ms"] = bench(lambda: compressor_pool(*args, impl="triton"), warmup=3, rep=50)["ms"]
            out[f"{name}_pool_torch_ms"] = bench(lambda: compressor_pool(*args, impl="torch"), warmup=3, rep=50)["ms"]
    out["ms"] = out["main_ms"] + out["indexer_ms"]
    out["ms_fused"] = out["ms"]
    out["ms_torch_pool"] = out["main_torch_pool_ms"] + out["indexer_torch_pool_ms"]
    out["pool_fused_ms"] = out["main_pool_fused_ms"] + out["indexer_pool_fused_ms"]
    out["pool_torch_ms"] = out["main_pool_torch_ms"] + out["indexer_pool_torch_ms"]
    out["fp32_path_ms"] = out["main_fp32_ms"] + out["indexer_fp32_ms"]
    out["note"] = ("dsv4_lab.attention.compressor.Compressor, rope dim 64; ms (= ms_fused): bf16 u and weights -> "
                   "bf16-operand GEMMs with fp32 accumulation and output (docs §2.3 fp32 compute up to summation "
                   "order), then the fused pool + ape + RMSNorm + RoPE kernel (kernels/compressor_pool, "
                   "docs/kernels.md §11); ms_torch_pool: the same with the PyTorch pool (impl=torch); "
                   "pool_*_ms: pool + norm alone; fp32_path_ms: the module fed fp32 u (fp32 GEMMs, fused pool)")
    return out


def sparse_inputs(N, grad=False):
    q = torch.randn(1, N, H, D, **BF, requires_grad=grad)
    kv = torch.randn(1, N, D, **BF, requires_grad=grad)
    comp = torch.randn(1, N // M, D, **BF, requires_grad=grad)
    sink = torch.randn(H, device="cuda", requires_grad=grad)
    qI, kI, w = indexer_inputs(N)
    idx = indexer_topk_triton(qI, kI, w, K, M)
    return q, kv, comp, idx, sink


def sparse_fwd(N):
    q, kv, comp, idx, sink = sparse_inputs(N)
    r = bench(lambda: sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W), warmup=5, rep=100)
    if N <= 32768:
        r["host_ms"] = safe(host_ms, lambda: sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W))
    sel, win, _ = idx_pairs(N)
    s = r["ms"] * 1e-3
    r.update(tflops=4 * H * D * (sel + win) / s / 1e12, gather_tb_s=(sel + win) * D * 2 / s / 1e12,
             gather_sel_only_tb_s=sel * D * 2 / s / 1e12)
    return r


def sparse_fwd_bwd(N):
    q, kv, comp, idx, sink = sparse_inputs(N, grad=True)
    go = torch.randn_like(q)

    def step():
        o = sparse_attn_triton(q, kv, comp, idx, sink, D ** -0.5, W)
        torch.autograd.grad(o, (q, kv, comp, sink), go)
    return bench(step, warmup=3, rep=100)


def sparse_naive(N):
    q, kv, comp, idx, sink = sparse_inputs(N)
    return bench(lambda: sparse_attn_naive(q, kv, comp, idx, sink, D ** -0.5, W, chunk=2048), warmup=2, rep=50)


# the fused decode launch's other forms timed beside LEVEL0_CONFIG (indexer_topk/triton.py): more programs per row,
# narrower tiles, deeper or shallower key pipelines
LEVEL0_VARIANTS = ({"programs": 256}, {"BLOCK_N": 128}, {"num_stages": 4}, {"num_stages": 2},
                   {"programs": 256, "BLOCK_N": 128, "num_warps": 4})


def graph_floor(out):
    """out graph_floor_us / graph_floor_gpu_us: what a replay costs with one tiny kernel in it."""
    tiny = torch.zeros(1, device="cuda")
    replays_us(out, "graph_floor", lambda: tiny.add_(1.0))


def decode(N):
    S = N // M
    qI, kI, w = indexer_inputs(N, T=1)
    q = torch.randn(1, 1, H, D, **BF)
    kv = torch.randn(1, N, D, **BF)
    comp = torch.randn(1, S, D, **BF)
    sink = torch.randn(H, device="cuda")
    out = {"indexer_key_bytes": S * DI * 2}
    i_ref = indexer_topk_naive(qI, kI, w, K, M, q_offset=N - 1)
    buf = torch.empty(S, dtype=torch.float32, device="cuda")
    r = bench_graph(lambda: indexer_scores_triton(qI, kI, w, M, N - 1, out=buf, fill=False), reps=50)
    out["score_us"] = r["ms"] * 1e3
    out["score_tb_s"] = S * DI * 2 / (r["ms"] * 1e-3) / 1e12
    # bf16 scores (select_bf16's), tuned launch and the launch that also counts the select's first digit (level0,
    # into a workspace of its own: these calls leave its histograms non-zero, no select runs after them)
    bbuf = torch.empty(S, dtype=torch.bfloat16, device="cuda")
    for tag, l0 in (("score_bf16", None), ("score_bf16_level0", (sel.SelectWorkspace(1), K))):
        r = bench_graph(lambda l0=l0: indexer_scores_triton(qI, kI, w, M, N - 1, out=bbuf, fill=False,
                                                            dtype=torch.bfloat16, level0=l0), reps=50)
        out[f"{tag}_us"] = r["ms"] * 1e3
        out[f"{tag}_tb_s"] = S * DI * 2 / (r["ms"] * 1e-3) / 1e12
    out["level0_config"] = dict(itk.LEVEL0_CONFIG, chunk=itk.level0_chunk(S))
    best = None
    from dsv4_lab.kernels.indexer_topk.rowselect import MAX_L
    # the select methods also as one launch with grid barriers (select.ONE_LAUNCH), and with their first digit
    # counted by the score launch (triton.FUSE_LEVEL0), each alone and both
    sel_methods = [m for m in METHODS if m.startswith("select")]
    # (not the sieve methods: one program per row, it would stream the decode row alone)
    runs = [(m, False, False) for m in METHODS if not m.startswith("sieve")] + [(m, ol, fu) for m in sel_methods
                                                    for ol, fu in ((True, False), (False, True), (True, True))]
    calls = {}                                    # name -> the timed call (the best one is timed held again below)
    for method, one_launch, fuse in runs:
        name = method + ("_one_launch" if one_launch else "") + ("_fused" if fuse else "")
        if method.startswith("rowsel") and S > MAX_L:                          # would run select: measured already
            continue

        def one(method=method, one_launch=one_launch, fuse=fuse):
            old, sel.ONE_LAUNCH = sel.ONE_LAUNCH, one_launch
            try:
                return indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1, method=method, fuse_level0=fuse)
            finally:
                sel.ONE_LAUNCH = old
        calls[name] = one
        try:
            if method in BF16_METHODS:                                 # bf16 scores: recall of fp32 picks
                out[f"indexer_{name}_recall_vs_fp32"] = recall(one(), i_ref)
            else:
                same = torch.equal(torch.sort(one(), -1).values, torch.sort(i_ref, -1).values)   # index sets
                out[f"indexer_{name}_matches_naive_set"] = same                                  # (no ties)
            if fuse:                                                   # the same picks, slot for slot
                unfused = one(fuse=False)
                out[f"indexer_{name}_same_as_unfused"] = torch.equal(one(), unfused)
            if fuse and not one_launch:                 # other fused launch forms (LEVEL0_CONFIG), each checked
                for var in LEVEL0_VARIANTS:
                    keep = dict(itk.LEVEL0_CONFIG)
                    itk.LEVEL0_CONFIG.update(var)
                    try:
                        tag = f"indexer_{name}_" + "_".join(f"{a}{v}" for a, v in var.items())
                        out[f"{tag}_same_as_unfused"] = torch.equal(one(), unfused)
                        out[f"{tag}_us"] = bench_graph(one, reps=50)["ms"] * 1e3
                    except Exception as e:                                     # noqa: BLE001
                        out[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    finally:
                        itk.LEVEL0_CONFIG.clear()
                        itk.LEVEL0_CONFIG.update(keep)
            r = bench_graph(one, reps=50)
            out[f"indexer_{name}_us"] = r["ms"] * 1e3
            if method.startswith("select") and (one_launch, fuse) != (sel.ONE_LAUNCH, itk.FUSE_LEVEL0):
                continue                      # csa_decode_us: what the library runs (one launch, fused: opt-in)
            if best is None or r["ms"] * 1e3 < out[f"indexer_{best}_us"]:
                best = name
        except Exception as e:                                                 # noqa: BLE001
            out[f"indexer_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        torch.cuda.empty_cache()
    try:
        calls["torch_topk"] = lambda: indexer_topk_naive(qI, kI, w, K, M, q_offset=N - 1, use_topk=True)
        r = bench_graph(calls["torch_topk"], reps=20)
        out["indexer_torch_topk_us"] = r["ms"] * 1e3                                     # naive PyTorch path
        if best is None or out["indexer_torch_topk_us"] < out[f"indexer_{best}_us"]:
            best = "torch_topk"
    except Exception as e:                                                     # noqa: BLE001
        out["indexer_torch_topk_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    idx = indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1)

    def attend():
        return sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W, q_offset=N - 1)
    replays_us(out, "sparse_attn", attend, captures=CAPTURES)
    plain = attend()
    with mock.patch.object(sd, "PDL", True):   # its two launches with programmatic dependent launch: the same output
        out["sparse_attn_pdl_same"] = all(map(torch.equal, attend(), plain))
        replays_us(out, "sparse_attn_pdl", attend)
    # fewer, longer splits than the planner's (~4 x SMs programs: at one query one 32-entry block each, NS 20 here);
    # the combine launch reads every split's partials: sparse_attn_ns<n>_* (n: num_splits asked; NS as planned)
    for ns in (4, 8, 16):
        def attend_ns(ns=ns):
            return sd.sparse_attn_decode_fwd(q, kv, comp, idx, sink, D ** -0.5, W, q_offset=N - 1, num_splits=ns)
        o_ns, lse_ns = attend_ns()
        out[f"sparse_attn_ns{ns}_close"] = bool(torch.allclose(o_ns.float(), plain[0].float(), atol=2e-2, rtol=2e-2)
                                               and torch.allclose(lse_ns, plain[1], atol=1e-4, rtol=1e-5))
        replays_us(out, f"sparse_attn_ns{ns}", attend_ns)
    if best is not None:
        out["best_indexer"] = best
        # the best indexer timed again in CAPTURES captures of its own (its figure above, one capture, chose it: the
        # lowest of several single captures leans low), both ways: one call per replay, and from the GPU's start of
        # the replay (without the replay's own start)
        replays_us(out, "indexer_best", calls[best], captures=CAPTURES)
        out["csa_decode_us"] = out["indexer_best_us"] + out["sparse_attn_us"]
        out["csa_decode_gpu_us"] = out["indexer_best_gpu_us"] + out["sparse_attn_gpu_us"]
        if best.startswith("select"):        # with programmatic dependent launch (select.py PDL), the same picks
            idx_best = calls[best]()
            with mock.patch.object(sel, "PDL", True):
                out["indexer_best_pdl_same_picks"] = bool(torch.equal(calls[best](), idx_best))
                replays_us(out, "indexer_best_pdl", calls[best])
    try:                          # the same step as one graph: the library's indexer, then the sparse attention
        def step():
            return sparse_attn_fwd(q, kv, comp, indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1), sink,
                                   D ** -0.5, W, q_offset=N - 1)
        replays_us(out, "csa_decode_chain", step, captures=CAPTURES)
        # the same chain with PDL in every select's and the attention's launches, and with none
        for nmp, pdl in (("pdl", True), ("nopdl", False)):
            with mock.patch.object(sel, "PDL", pdl), mock.patch.object(ts, "PDL", pdl), \
                    mock.patch.object(sd, "PDL", pdl):
                out[f"indexer_default_{nmp}_same_picks"] = bool(torch.equal(
                    indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1), idx))
                replays_us(out, f"csa_decode_chain_{nmp}", step)
                out[f"csa_decode_chain_{nmp}_in_graph_us"] = bench_graph(
                    lambda: [step() for _ in range(CHAIN_CALLS)])["ms"] * 1e3 / CHAIN_CALLS
        out["csa_decode_chain_in_graph_us"] = bench_graph(lambda: [step() for _ in range(CHAIN_CALLS)])["ms"] \
            * 1e3 / CHAIN_CALLS
        # the chain with the selects' launches apart (select.ONE_LAUNCH off; the defaults take one cooperative
        # launch where the programs fit: the fp32 rows' tail select from digit 1)
        with mock.patch.object(sel, "ONE_LAUNCH", False):
            out["indexer_default_multi_launch_same_picks"] = bool(torch.equal(
                indexer_topk_triton(qI, kI, w, K, M, q_offset=N - 1), idx))
            replays_us(out, "csa_decode_chain_multi_launch", step, captures=CAPTURES)
            out["csa_decode_chain_multi_launch_in_graph_us"] = bench_graph(
                lambda: [step() for _ in range(CHAIN_CALLS)])["ms"] * 1e3 / CHAIN_CALLS
        graph_floor(out)
    except Exception as e:                                                     # noqa: BLE001
        out["csa_decode_chain_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        _decode_mxfp4(out, qI, kI, w, i_ref, N)
    except Exception as e:                                                     # noqa: BLE001
        out["mxfp4_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def _decode_mxfp4(out, qI, kI, w, i_ref, N):
    """The same decode indexer on keys stored as the paper caches them (MXFP4: E2M1 codes + one E8M0 byte per 32;
    naive.MXFP4Keys, unpacked in the score kernel): `score_mxfp4_us` / `_tb_s` (packed bytes), the select methods'
    `indexer_{method}_mxfp4_us`, their recall of the fp32 picks on the unquantised keys (`i_ref`), and
    `csa_decode_mxfp4_us` = the best of them + the sparse attention (whose main entries stay bf16 here)."""
    from dsv4_lab.kernels.indexer_topk import MXFP4Keys
    from dsv4_lab.quant.mxfp4 import mxfp4_quantize
    keys = MXFP4Keys(*mxfp4_quantize(kI))
    S = kI.shape[1]
    out["indexer_key_bytes_mxfp4"] = keys.codes.numel() + keys.scales.numel()
    buf = torch.empty(S, dtype=torch.float32, device="cuda")
    r = bench_graph(lambda: indexer_scores_triton(qI, keys, w, M, N - 1, out=buf, fill=False), reps=50)
    out["score_mxfp4_us"] = r["ms"] * 1e3
    out["score_mxfp4_tb_s"] = out["indexer_key_bytes_mxfp4"] / (r["ms"] * 1e-3) / 1e12
    best = None
    for method in ("select_bf16", "select"):
        name = f"{method}_mxfp4"
        one = lambda method=method: indexer_topk_triton(qI, keys, w, K, M, q_offset=N - 1, method=method)  # noqa
        out[f"indexer_{name}_recall_vs_fp32"] = recall(one(), i_ref)
        out[f"indexer_{name}_us"] = bench_graph(one, reps=50)["ms"] * 1e3
        if best is None or out[f"indexer_{name}_us"] < out[f"indexer_{best}_us"]:
            best = name
    out["best_indexer_mxfp4"] = best
    out["csa_decode_mxfp4_us"] = out[f"indexer_{best}_us"] + out["sparse_attn_us"]


def sdpa_flash(N):
    """Dense causal MQA by SDPA FLASH_ATTENTION (H 16 x d 128, one KV head, bf16, B 1), as bench_dense.prefill."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, H, N, D, **BF)
    k = torch.randn(1, 1, N, D, **BF)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    return bench(run, warmup=5, rep=60 if N <= 32768 else 200)


def topk_row(L=262144):
    """One decode row of L = 256K scores, k = 512: torch.topk (sorted / unsorted, fp32 / bf16 row) vs radix_select
    (indexer_topk/select.py) on the same rows, CUDA-graph replay; values checked against torch.topk, select's
    picks against 5 repeats (the same indices in the same slots)."""
    from dsv4_lab.kernels.indexer_topk.select import SelectWorkspace, radix_select
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, L, device="cuda", generator=g)
    xb = x.bfloat16()
    ws = SelectWorkspace(1, programs=256)                                               # up to 256 programs
    out = {"L": L, "k": K}
    for nm, row in (("fp32", x), ("bf16", xb)):
        ref = torch.topk(row.float(), K).values
        v, i = radix_select(row, K, workspace=ws, one_launch=False)
        out[f"select_{nm}_values_match_torch_topk"] = bool(torch.equal(torch.sort(v, -1, descending=True).values,
                                                                       ref))
        out[f"select_{nm}_bitwise_repeatable"] = all(
            torch.equal(i, radix_select(row, K, workspace=ws, one_launch=False)[1])
            for _ in range(5))                                              # the slot order is fixed (select.py)
        replays_us(out, f"select_{nm}", lambda row=row: radix_select(row, K, workspace=ws, one_launch=False))
        # with programmatic dependent launch (select.py PDL: each launch starts before the one before it ends)
        vp, ip = radix_select(row, K, workspace=ws, one_launch=False, pdl=True)
        out[f"select_{nm}_pdl_same_picks"] = bool(torch.equal(ip, i) and torch.equal(vp, v) and not ws.hist.any())
        replays_us(out, f"select_{nm}_pdl", lambda row=row: radix_select(row, K, workspace=ws, one_launch=False,
                                                                         pdl=True))
        # one launch, a grid barrier per digit level: the same picks in the same slots, the workspace left zeroed
        v1, i1 = radix_select(row, K, workspace=ws, one_launch=True)
        out[f"select_{nm}_one_launch_same_picks"] = bool(torch.equal(i1, i) and torch.equal(v1, v)
                                                         and not ws.hist.any())
        for P in (128, 64, 32):
            blk = min(2048, L // P)
            out[f"select_{nm}_one_launch_p{P}_us"] = bench_graph(lambda P=P, row=row, blk=blk: radix_select(
                row, K, programs=P, workspace=ws, block=blk, one_launch=True))["ms"] * 1e3
        replays_us(out, f"select_{nm}_one_launch", lambda row=row: radix_select(row, K, workspace=ws,
                                                                                 one_launch=True), captures=CAPTURES)
        with mock.patch.object(sel, "COOPERATIVE", False):     # the same launch without the cooperative attribute
            replays_us(out, f"select_{nm}_one_launch_nocoop", lambda row=row: radix_select(
                row, K, workspace=ws, one_launch=True))
        if nm == "fp32":                  # the tail select (tailselect.py): two digits, then the exact tail
            v2, i2 = ts.tail_select(row, K, workspace=ws)
            out["select_tail_fp32_same_picks"] = bool(torch.equal(i2, i) and torch.equal(v2, v)
                                                      and not ws.hist.any())
            replays_us(out, "select_tail_fp32", lambda row=row: ts.tail_select(row, K, workspace=ws),
                       captures=CAPTURES)
            for nmp, pdl in (("pdl", True), ("nopdl", False)):    # launches apart, with PDL (tailselect.PDL) and not
                vp, ip = ts.tail_select(row, K, workspace=ws, pdl=pdl, one_launch=False)
                out[f"select_tail_fp32_{nmp}_same_picks"] = bool(torch.equal(ip, i) and torch.equal(vp, v)
                                                                 and not ws.hist.any())
                replays_us(out, f"select_tail_fp32_{nmp}", lambda row=row, pdl=pdl: ts.tail_select(
                    row, K, workspace=ws, pdl=pdl, one_launch=False), captures=CAPTURES)
            # per call of CHAIN_CALLS in one graph: the defaults (one launch where it fits, select.ONE_LAUNCH) and
            # the launches apart; the one launch without the cooperative attribute (select.COOPERATIVE)
            for nmf, one in (("", None), ("_pdl", False)):
                out[f"select_tail_fp32{nmf}_in_graph_us"] = bench_graph(lambda row=row, one=one: [ts.tail_select(
                    row, K, workspace=ws, one_launch=one) for _ in range(CHAIN_CALLS)])["ms"] * 1e3 / CHAIN_CALLS
            with mock.patch.object(sel, "COOPERATIVE", False):
                replays_us(out, "select_tail_fp32_one_launch_nocoop", lambda row=row: ts.tail_select(
                    row, K, workspace=ws, one_launch=True))
            for P in (64, 256):
                blk = min(2048, L // P)
                out[f"select_tail_fp32_p{P}_us"] = bench_graph(lambda P=P, row=row, blk=blk: ts.tail_select(
                    row, K, programs=P, block=blk, workspace=ws))["ms"] * 1e3
            # the tail in its CAP-entry tile whatever the bucket's size (the small tile off): the small tile's share
            v3, i3 = ts.tail_select(row, K, workspace=ws, small_cap=1024)
            out["select_tail_fp32_one_tile_same_picks"] = bool(torch.equal(i3, i) and torch.equal(v3, v))
            out["select_tail_fp32_one_tile_us"] = bench_graph(lambda row=row: ts.tail_select(
                row, K, workspace=ws, small_cap=1024))["ms"] * 1e3
        replays_us(out, f"torch_topk_{nm}", lambda row=row: torch.topk(row, K))
        out[f"torch_topk_unsorted_{nm}_us"] = bench_graph(lambda row=row: torch.topk(row, K, sorted=False))["ms"] * 1e3
    for P in (32, 64, 256):                                  # programs per row around the default (128 at 256K)
        blk = min(2048, L // P)                              # chunks are whole blocks: 256 programs need 1024
        for nm, row in (("fp32", x), ("bf16", xb)):
            out[f"select_{nm}_p{P}_us"] = bench_graph(lambda P=P, row=row, blk=blk: radix_select(
                row, K, programs=P, workspace=ws, block=blk, one_launch=False))["ms"] * 1e3
    for nw, blk in ((4, 2048), (16, 2048), (8, 1024)):       # the default programs, other warps / loop steps
        for nm, row in (("fp32", x), ("bf16", xb)):
            v2, i2 = radix_select(row, K, workspace=ws, one_launch=False, num_warps=nw, block=blk)
            tag = f"select_{nm}_w{nw}_b{blk}"
            out[f"{tag}_same_picks"] = bool(torch.equal(i2, radix_select(row, K, workspace=ws, one_launch=False)[1]))
            out[f"{tag}_us"] = bench_graph(lambda row=row, nw=nw, blk=blk: radix_select(
                row, K, workspace=ws, one_launch=False, num_warps=nw, block=blk))["ms"] * 1e3
    graph_floor(out)
    out["note"] = ("*_us: one call per CUDA-graph replay, the replay's own start included (graph_floor_us: one tiny "
                   "kernel); *_gpu_us: the same replay timed from the GPU's start of it (common.bench_graph "
                   "hold=True). select_* = radix_select (fp32: 4 digit launches; bf16: 2) and the emit launch "
                   "(which leaves the histograms zeroed: no zeroing launch); select_tail_fp32 = tail_select (2 digit "
                   "launches and an emit whose last program settles the low 16 bits; its defaults, tailselect.PDL "
                   "included; _pdl / _nopdl: with and without programmatic dependent launch; _one_tile: that tail in "
                   "the 1024-entry tile even for a small bucket); select_*_pdl: with programmatic dependent launch; "
                   "select_*_one_launch_* = the same levels and emit in one launch, a grid barrier per level "
                   "(cooperative launch, select.COOPERATIVE; _nocoop without the attribute; select_tail_fp32: the "
                   "defaults, one launch since select.ONE_LAUNCH; _pdl / _nopdl: launches apart); *_in_graph_us: per "
                   f"call of {CHAIN_CALLS} calls captured in one graph; "
                   f"select_tail_fp32 and its _pdl / _nopdl: the median of {CAPTURES} captures, each its own graph "
                   "(*_captures_us: every capture's)")
    return out


def topk_rows_prefill(R=2048, L=32768):
    """Prefill-like rows (R x L bf16 scores, k = 512; the last 2K rows of a 128K prefill): torch.topk (fp32 / bf16,
    unsorted) vs radix_select with one program per row at digit widths 4 / 8, blocks and warps (do_bench). The row
    select is timed by length in `rows_by_length` (with it timed here at 32K too, the family did not finish inside
    its 120 s cap in run 26)."""
    from dsv4_lab.kernels.indexer_topk.select import SelectWorkspace, radix_select
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(R, L, device="cuda", generator=g).bfloat16()
    xf = x.float()
    ws = SelectWorkspace(R)
    out = {"R": R, "L": L, "k": K, "bytes_bf16": R * L * 2}
    out["torch_topk_unsorted_bf16_ms"] = bench(lambda: torch.topk(x, K, sorted=False), warmup=3, rep=30)["ms"]
    out["torch_topk_unsorted_fp32_ms"] = bench(lambda: torch.topk(xf, K, sorted=False), warmup=3, rep=30)["ms"]
    ref = torch.topk(xf[:8], K).values
    for db in (4, 8):
        for blk, nw in ((2048, 8), (4096, 8), (1024, 4), (4096, 16)):
            def run(db=db, blk=blk, nw=nw):
                return radix_select(x, K, programs=1, workspace=ws, digit_bits=db, block=blk, num_warps=nw)
            try:
                v, _ = run()
                ok = torch.equal(torch.sort(v[:8], -1, descending=True).values, ref)
                out[f"select_bf16_d{db}_b{blk}_w{nw}_ms"] = bench(run, warmup=3, rep=30)["ms"]
                out[f"select_bf16_d{db}_b{blk}_w{nw}_values_ok"] = ok
            except Exception as e:                                             # noqa: BLE001
                out[f"select_bf16_d{db}_b{blk}_w{nw}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def rows_by_length(lengths=(1024, 2048, 4096, 8192, 16384)):
    """The row select against torch.topk on one prefill query chunk per row length L: R = min(8192, 2^28 / L) fp32
    score rows whose causal frontiers run up to L (ratio 4: the last chunk of a prefill of 4 L tokens),
    k = 512, do_bench. torch.topk (unsorted) reads rows whose invisible tail holds -inf (the score kernel writes it
    for the torch methods); rowsel reads each row up to its frontier. `rowsel_faster_up_to_L`: the longest L at
    which rowsel was faster, the measurement behind indexer_topk.triton.AUTO_SHORT_L."""
    from dsv4_lab.kernels.indexer_topk.rowselect import row_select
    from dsv4_lab.kernels.indexer_topk.triton import _topk_torch
    g = torch.Generator(device="cuda").manual_seed(8)
    out = {"k": K, "ratio": M}
    for L in lengths:
        R = min(8192, (1 << 28) // L)
        q0 = max(0, M * L - R)
        x = torch.randn(R, L, device="cuda", generator=g)
        n = torch.clamp((q0 + torch.arange(R, device="cuda") + 1) // M, max=L)
        xt = x.masked_fill(torch.arange(L, device="cuda")[None, :] >= n[:, None], float("-inf"))
        r = {"R": R, "L": L}
        r["torch_ms"] = bench(lambda xt=xt: _topk_torch(xt, K, ordered=False), warmup=3, rep=30)["ms"]
        v, _ = row_select(x, K, frontier=(R, q0, M))
        r["rowsel_values_match_torch"] = bool(torch.equal(torch.sort(v, -1, descending=True).values,
                                                          torch.topk(xt, K).values))
        r["rowsel_ms"] = bench(lambda x=x, R=R, q0=q0: row_select(x, K, frontier=(R, q0, M)), warmup=3,
                               rep=30)["ms"]
        out[f"{L}"] = r
        del x, xt
        torch.cuda.empty_cache()
    wins = [L for L in lengths if out[f"{L}"]["rowsel_ms"] < out[f"{L}"]["torch_ms"]]
    out["rowsel_faster_up_to_L"] = max(wins) if wins else None
    return out


# (dtype, num_warps[, other select arguments]): one program per row is latency-bound (docs/kernels.md §3), so the
# warps per program (programs per SM) are the first knob; wider search steps (several key bits per step) measured
# slower and left the package (csa.json topk_row.sieve_probe / rowsel_probe keep their rows, tagged _w<bits>_)
SIEVE_PROBE = (("bf16", 2), ("bf16", 4), ("bf16", 8), ("bf16", 16), ("fp32", 4), ("fp32", 8),
               # the sieve's other knobs at its default 8 warps (sieve_select: block, samples (NS, SB), cand)
               ("bf16", 8, {"block": 1024}), ("bf16", 8, {"block": 4096}), ("bf16", 16, {"block": 4096}),
               ("bf16", 8, {"samples": (8, 64)}), ("bf16", 8, {"samples": (32, 64)}), ("bf16", 8, {"cand": 4096}),
               # the k-th keys by histogram digits instead of bisection (rowselect.py _kth_key_hist)
               ("bf16", 8, {"kth_bits": 4}), ("bf16", 8, {"kth_bits": 8}), ("fp32", 4, {"kth_bits": 4}))
ROWSEL_PROBE = (("bf16", 2), ("bf16", 4), ("bf16", 8), ("fp32", 4), ("fp32", 8))


def select_probe(select, R, L, fr, configs, ref_warps, seed, device="cuda", paths=False):
    """One row-per-program select `select(x, k, frontier=, num_warps=, **extra)` on R rows of up to L visible entries
    (frontier fr), k = 512, randn scores in bf16 and fp32; per (dtype, num_warps[, extra keyword arguments]) the time
    (do_bench) and whether the picks equal those at ref_warps warps slot for slot (they must: the knobs change only
    the schedule). paths: also count the rows by the path they took (sieve.py's `paths`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    xs = {"fp32": torch.randn(R, L, device=device, generator=g)}
    xs["bf16"] = xs["fp32"].bfloat16()
    out = {"R": R, "L": L, "k": K, "frontier": list(fr)}
    refs = {}
    for dt, nw, *rest in configs:
        kw = rest[0] if rest else {}
        x = xs[dt]
        if dt not in refs:
            refs[dt] = select(x, K, frontier=fr, num_warps=ref_warps)
        tag = f"{dt}_nw{nw}" + "".join(f"_{k}{'x'.join(map(str, v)) if isinstance(v, tuple) else v}"
                                       for k, v in kw.items())
        try:
            pt = {"paths": torch.full((R,), -1, dtype=torch.int32, device=device)} if paths else {}
            v, i = select(x, K, frontier=fr, num_warps=nw, **kw, **pt)
            out[f"{tag}_same_picks"] = bool(torch.equal(i, refs[dt][1]) and torch.equal(v, refs[dt][0]))
            if paths:
                out[f"{tag}_rows_by_path"] = torch.bincount(pt["paths"].long(), minlength=5).tolist()
            out[f"{tag}_ms"] = bench(lambda x=x, nw=nw, kw=kw: select(x, K, frontier=fr, num_warps=nw, **kw),
                                     warmup=3, rep=20)["ms"]
        except Exception as e:                                                 # noqa: BLE001
            out[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def sieve_probe(R=8192, L=32768, device="cuda"):
    """The sieve select (sieve.py) on the longest query chunk of a 128K prefill: rows of L - R / 4 + 1 .. L visible
    entries (causal frontier, ratio 4); R = 16384, L = 4096: the last 16K queries' rows of a 16K training step."""
    from dsv4_lab.kernels.indexer_topk.sieve import sieve_select
    return select_probe(sieve_select, R, L, (R, M * L - R, M), SIEVE_PROBE, 8, 9, device, paths=True)


def rowsel_probe(R=8192, L=2048, device="cuda"):
    """The row select (rowselect.py) on an 8K prefill's index rows: every query of it, 0 .. L visible entries."""
    from dsv4_lab.kernels.indexer_topk.rowselect import row_select
    return select_probe(row_select, R, L, (R, 0, M), ROWSEL_PROBE, 4, 10, device)


def prefill_chain(N, method):
    """CSA prefill at N as one call chain on fixed inputs: main + indexer compressors (bf16 u, fused pool + RoPE), the
    indexer top-k (`method`) and the sparse attention. Returns (run, staged): run() makes one call; staged(mark) makes
    one and calls mark(name) at the end of each stage (common.host_stages_ms). The indexer keys skip the Hadamard
    rotation (one small GEMM). As in the model, the compressors' fp32 entries reach the indexer and the sparse
    attention in the queries' dtype (bf16): Indexer.project casts kI to qI's dtype, Attention.attend the entries to
    q's."""
    from dsv4_lab.attention.compressor import Compressor
    from dsv4_lab.rope import RotaryTable
    g = torch.Generator(device="cuda").manual_seed(N + 1)
    u = torch.randn(1, N, DM, generator=g, **BF)
    main, icomp = (Compressor(DM, c, M, overlap=True).to("cuda", torch.bfloat16) for c in (D, DI))
    rope = RotaryTable(64, N, 10000.0).cuda()
    qI, _, w = indexer_inputs(N)
    q, kv, _, _, sink = sparse_inputs(N)
    ws = torch.empty(1 << 28, dtype=torch.float32, device="cuda")

    @torch.no_grad()
    def run():
        comp = main(u, rope).to(q.dtype)
        kI = icomp(u, rope).to(qI.dtype)
        idx = indexer_topk_triton(qI, kI, w, K, M, method=method, workspace=ws)
        return sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W)

    @torch.no_grad()
    def staged(mark):                                   # run(), marking the end of each stage for host_stages_ms
        comp = main(u, rope).to(q.dtype)
        mark("main_compressor")
        kI = icomp(u, rope).to(qI.dtype)
        mark("indexer_compressor")
        idx = indexer_topk_triton(qI, kI, w, K, M, method=method, workspace=ws)
        mark("indexer_topk")
        sparse_attn_fwd(q, kv, comp, idx, sink, D ** -0.5, W)
        mark("sparse_attn")
    return run, staged


def pipeline(N, method):
    """`prefill_chain` timed end to end three ways, each against SDPA-flash timed the same way: eager (do_bench: the
    host's launches are in the time wherever it enqueues slower than the GPU runs), eager queued behind a sleep
    (common.bench_queued: the same launches on the GPU alone, as inside a forward pass whose GPU is the bottleneck)
    and replayed from a CUDA graph. The component sums in `csa_prefill` add up separately timed calls, each with its
    own launch overhead."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    run, staged = prefill_chain(N, method)
    qd, kd = torch.randn(1, H, N, D, **BF), torch.randn(1, 1, N, D, **BF)

    def dense():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True)
    r = {"method": method, "ms": bench(run, warmup=5, rep=60)["ms"], "graph_ms": bench_graph(run)["ms"],
         "host": safe(host_ms, run), "host_stages": safe(host_stages_ms, staged),
         "sdpa_flash_ms": bench(dense, warmup=5, rep=60)["ms"],
         "sdpa_flash_graph_ms": bench_graph(dense)["ms"], "sdpa_flash_host": safe(host_ms, dense),
         "queued": safe(bench_queued, run), "sdpa_flash_queued": safe(bench_queued, dense)}
    r["speedup_vs_sdpa_flash"] = r["sdpa_flash_ms"] / r["ms"]
    r["graph_speedup_vs_sdpa_flash"] = r["sdpa_flash_graph_ms"] / r["graph_ms"]
    if r["queued"].get("held") and r["sdpa_flash_queued"].get("held"):    # both GPU times, no host gaps in them
        r["queued_speedup_vs_sdpa_flash"] = r["sdpa_flash_queued"]["ms"] / r["queued"]["ms"]
    return r


def prefill_family(N):
    """SDPA-flash, compressor, indexer (scores + every method), sparse attention and CSA prefill at one N."""
    res = {"indexer": {}, "compressor": {}, "sparse": {}, "csa_prefill": {}, "dense": {}, "agreement": {}}
    ix = res["indexer"]
    res["dense"][f"sdpa_flash_{N}"] = safe(sdpa_flash, N)
    if N == 8192:
        res["agreement"][f"{N}"] = safe(agreement, N)
    ix[f"scores_{N}"] = safe(scores_only, N)
    for m in METHODS:
        ix[f"{m}_{N}"] = safe(indexer_method, N, m)
        torch.cuda.empty_cache()
    if N <= 32768:
        ix[f"torch_topk_{N}"] = safe(indexer_naive, N)
    cands = {m: ix[f"{m}_{N}"]["ms"] for m in METHODS + ("torch_topk",) if "ms" in ix.get(f"{m}_{N}", {})}
    if cands:
        b = min(cands, key=cands.get)
        ix[f"best_{N}"] = {"method": b, "ms": cands[b]}
        c32 = {m: t for m, t in cands.items() if m not in BF16_METHODS}
        if c32:
            b32 = min(c32, key=c32.get)
            ix[f"best_fp32_scores_{N}"] = {"method": b32, "ms": c32[b32]}
    res["compressor"][f"{N}"] = safe(compressor, N)
    res["sparse"][f"triton_{N}"] = safe(sparse_fwd, N)
    if N == 8192:
        res["sparse"][f"naive_{N}"] = safe(sparse_naive, N)
    comp, sp = res["compressor"][f"{N}"], res["sparse"][f"triton_{N}"]
    dense = res["dense"][f"sdpa_flash_{N}"]
    for tag, best in (("triton", ix.get(f"best_{N}", {})), ("triton_fp32_scores", ix.get(f"best_fp32_scores_{N}", {}))):
        if "ms" in best and "ms" in comp and "ms" in sp:
            r = {"ms": comp["ms"] + best["ms"] + sp["ms"], "compressor_ms": comp["ms"], "indexer_ms": best["ms"],
                 "indexer_method": best["method"], "sparse_ms": sp["ms"],
                 "ms_without_compressor": best["ms"] + sp["ms"]}
            if "recall_vs_fp32" in ix[f"{best['method']}_{N}"]:
                r["indexer_recall_vs_fp32"] = ix[f"{best['method']}_{N}"]["recall_vs_fp32"]
            if "ms" in dense:
                r["sdpa_flash_ms"] = dense["ms"]
                r["speedup_vs_sdpa_flash"] = dense["ms"] / r["ms"]
            res["csa_prefill"][f"{tag}_{N}"] = r
        else:
            res["csa_prefill"][f"{tag}_{N}"] = {"error": "component missing"}
    if "method" in ix.get(f"best_{N}", {}) and ix[f"best_{N}"]["method"] in METHODS:
        res["csa_prefill"][f"pipeline_{N}"] = safe(pipeline, N, ix[f"best_{N}"]["method"])
    return res


def _family(name):
    if name == "topk_row":
        return {"topk_row": {"262144": safe(topk_row)}}
    if name == "prefill_rows":                  # apart from topk_row: together they overran one family's cap
        return {"topk_row": {"prefill_rows": safe(topk_rows_prefill)}}
    if name == "sieve_probe":                       # and the rows of a 16K training step (index rows of <= 4K)
        return {"topk_row": {"sieve_probe": safe(sieve_probe),
                             "sieve_probe_4k": safe(lambda: sieve_probe(R=16384, L=4096))}}
    if name == "rowsel_probe":
        return {"topk_row": {"rowsel_probe": safe(rowsel_probe)}}
    if name == "rows_by_length":
        return {"topk_row": {"rows_by_length": safe(rows_by_length)}}
    if name.startswith("decode_"):
        N = int(name.split("_")[1])
        return {"decode": {f"{N}": safe(decode, N)}}
    if name.startswith("prefill_"):
        return prefill_family(int(name.split("_")[1]))
    if name == "fwd_bwd":
        return {"fwd_bwd": {"triton_8192": safe(sparse_fwd_bwd, 8192)}}
    if name == "score_configs":
        return {"indexer": {"score_configs": safe(score_configs)}}
    _bad(f"bench_csa: --family {name!r}; allowed: topk_row, prefill_rows, rows_by_length, sieve_probe, rowsel_probe, "
         "score_configs, decode_N, prefill_N, fwd_bwd")


# CSA_TRY (env, comma-separated): settings not yet the library's, applied in every family's subprocess; the run then
# writes csa_try_<settings>.json instead of csa.json, so a trial never stands in for the library's record
TRY = {"asm_stores": "the selects' inline PTX stores (indexer_topk/select.py ASM_STORES = True)",
       "score_candidates": "SCORE_CANDIDATE_CONFIGS appended to the score kernel's autotune list",
       "fuse_level0": "decode's score launch counts the select's first digit (indexer_topk/triton.py FUSE_LEVEL0)",
       "fp32_tail": "the select methods' fp32 rows through the tail select (indexer_topk/triton.py FP32_TAIL)",
       "pdl": "programmatic dependent launch in the selects' and the decode attention's launches "
              "(indexer_topk/select.py, tailselect.py, sparse_attn/triton_decode.py PDL)"}


def _bad(msg):
    """Bad input: one line on stderr, exit code 2."""
    print(msg, file=sys.stderr)
    raise SystemExit(2)


def _check_try(names):
    for name in names:
        if name not in TRY:
            _bad(f"bench_csa: CSA_TRY={name!r}; allowed: {', '.join(TRY)}")


def _apply_try(names):
    _check_try(names)
    for name in names:
        if name == "asm_stores":
            sel.ASM_STORES = True
        elif name == "score_candidates":
            itk._indexer_scores_fwd.configs.extend(itk.SCORE_CANDIDATE_CONFIGS)
        elif name == "fuse_level0":
            itk.FUSE_LEVEL0 = True
        elif name == "fp32_tail":
            itk.FP32_TAIL = True
        elif name == "pdl":
            sel.PDL = ts.PDL = sd.PDL = True


def _trying():
    return tuple(sorted(n for n in os.environ.get("CSA_TRY", "").split(",") if n))


FAMILIES = ("topk_row", "prefill_rows", "rows_by_length", "decode_1048576", "prefill_8192", "prefill_131072",
            "decode_131072", "prefill_32768", "fwd_bwd")


def _merge(dst, src):
    """A family's results into the saved ones: each entry it wrote (section -> entry, e.g. decode -> "1048576")
    replaces the saved entry whole, so no key of an earlier run (a removed method's) lingers beside the new ones;
    the entries it did not write stay."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            dst[k].update(v)
        else:
            dst[k] = v


def main(out_dir=None, families=FAMILIES, cap_s=None):
    """Every family in its own subprocess (time cap each), merged into csa.json after each one ends."""
    import json
    import subprocess
    import tempfile
    cap_s = int(os.environ.get("CSA_FAMILY_CAP_S", FAMILY_CAP_S)) if cap_s is None else cap_s
    if os.environ.get("CSA_FAMILIES"):                      # e.g. CSA_FAMILIES="topk_row decode_1048576"
        families = tuple(os.environ["CSA_FAMILIES"].split())
    t_start = time.time()
    res = {"shapes": {"H": H, "D": D, "m": M, "topk": K, "window": W, "HI": HI, "DI": DI, "B": 1, "d_model": DM,
                      "dtype": "bf16"},
           "indexer": {}, "compressor": {}, "sparse": {}, "fwd_bwd": {}, "decode": {}, "csa_prefill": {},
           "dense": {}, "topk_row": {}, "agreement": {}, "auto": dict(itk.AUTO), "families": {}}
    trying = _trying()
    _check_try(trying)
    if trying:
        res["try"] = {n: TRY[n] for n in trying}
    if os.environ.get("CSA_FAMILIES") and not trying:       # a subset: keep the other families' saved results
        from common import RESULTS
        path = os.path.join(RESULTS, "csa.json")
        if os.path.exists(path):
            old = {k: v for k, v in json.load(open(path)).items() if k not in ("env", "ceilings", "auto")}
            _merge(old, res)
            res = old
    for fam in families:
        t0 = time.time()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            part = f.name
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--family", fam, "--part", part],
                               timeout=cap_s, capture_output=True, text=True)
            status = "ok" if p.returncode == 0 else f"exit {p.returncode}: {p.stderr[-400:]}"
            if p.returncode == 0:
                _merge(res, json.load(open(part)))
        except subprocess.TimeoutExpired:
            status = f"timed out after {cap_s} s"
        finally:
            if os.path.exists(part):
                os.remove(part)
        res["families"][fam] = {"status": status, "seconds": round(time.time() - t0, 1)}
        print("csa", fam, status, f"t={time.time() - t_start:.0f}s",
              {k: v for k, v in res["csa_prefill"].items() if fam.endswith(k.split("_")[-1])},
              res["decode"].get(fam.split("_")[-1], {}).get("csa_decode_us"), res["topk_row"].get("262144", {})
              if fam == "topk_row" else "", flush=True)
        res["seconds"] = round(time.time() - t_start, 1)
        save("csa_try_" + "_".join(trying) if trying else "csa", res, out_dir)
    return res


def decode_only(out_dir=None, decode_Ns=(131072, 1048576), note=""):
    """Re-measure only the decode section and keep the rest of the saved csa.json (its env moves to env_rest)."""
    import json
    from common import RESULTS
    old = json.load(open(os.path.join(RESULTS, "csa.json")))
    res = {k: v for k, v in old.items() if k not in ("env", "ceilings")}
    res["env_rest"], res["ceilings_rest"] = old.get("env"), old.get("ceilings")
    res["decode"], res["decode_note"] = {}, note
    for N in decode_Ns:
        res["decode"][f"{N}"] = safe(decode, N)
        print("csa decode", N, res["decode"][f"{N}"], flush=True)
        torch.cuda.empty_cache()
    save("csa", res, out_dir)
    return res


if __name__ == "__main__":
    import argparse
    import json
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", help="run one family and write its part to --part (used by main)")
    ap.add_argument("--part")
    ap.add_argument("--decode-only", nargs="*")
    ap.add_argument("--families", nargs="*", help=f"subset of {', '.join(FAMILIES)}")
    a = ap.parse_args()
    if a.family:
        _apply_try(_trying())
        r = _family(a.family)
        with open(a.part, "w") as f:
            json.dump(r, f)
    elif a.decode_only is not None:
        decode_only(note=" ".join(a.decode_only))
    else:
        main(families=tuple(a.families) if a.families else FAMILIES)
