"""End-to-end training throughput of the `small` preset on one GPU (issue 7 item 8).

Three arms at context 4K / 16K / 64K, the same number of tokens per optimizer step (65536 = batch x context):
  v4-triton   preset small (DeepSeek-V4 at lab size: swa, swa, csa, hca, ...; mHC; MoE; MTP 1; indexer KL on),
              kernels=triton: SWA / CSA / HCA core attention and the CSA indexer top-k through the Triton kernels
  v4-torch    the same model, kernels=torch: the PyTorch reference path (explicit (T, T + S) masks)
  dense-sdpa  the same model with every attention layer dense causal MQA (layer_types=dense*8, attn_sink=false so
              PyTorch's fused SDPA kernel runs): the dense-attention baseline of the same size
One step = forward + backward + AdamW step under bf16 autocast (as dsv4_lab.train does on CUDA). Random token ids
(throughput does not depend on the data). Reported: median step time over `steps` timed steps after `warmup`
steps, tokens/s, peak memory. An arm that runs out of memory is retried with half the sequences per forward/backward
(gradient accumulation: same tokens per optimizer step) down to one; one that still does not fit, or exceeds the time
guard, is recorded as such.

    python benchmarks/bench_e2e.py [--ctx 4096 16384 65536] [--steps 4]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import env_info, save
from dsv4_lab import DSV4LM, ModelConfig
from dsv4_lab.config import TrainConfig
from dsv4_lab.train import build_optimizer

TOKENS_PER_STEP = 65536
ARMS = {
    "v4-triton": dict(kernels="triton"),
    "v4-torch": dict(kernels="torch"),
    "dense-sdpa": dict(layer_types="dense*8", attn_sink=False),
}


def run_arm(overrides: dict, ctx: int, warmup: int, steps: int, guard_s: float, tokens: int = TOKENS_PER_STEP,
            profile: bool = False, micro: int | None = None) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("small", max_seq_len=max(ctx, 4096), **overrides)
    model = DSV4LM(cfg).cuda().train()
    opt = build_optimizer(model, TrainConfig())
    B = max(1, tokens // ctx)
    mb = min(B, micro or B)                          # sequences per forward/backward (gradient accumulation below)
    ids = torch.randint(0, cfg.vocab_size, (B, ctx + 1), device="cuda")
    x, y = ids[:, :-1], ids[:, 1:]
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for j in range(0, B, mb):                    # one optimizer step over all B sequences
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x[j:j + mb], y[j:j + mb])
            (out.loss * (x[j:j + mb].shape[0] / B)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(out.loss.item())
        if i >= warmup:
            times.append(dt)
        if dt > guard_s:
            return {"error": f"time guard: step {i} took {dt:.1f} s > {guard_s} s", "step_s": dt, "batch": B}
    times.sort()
    med = times[len(times) // 2]
    top = None
    if profile:                                      # one more step under the profiler: where the GPU time goes
        try:
            from torch.profiler import ProfilerActivity, profile as prof
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x, y)
                out.loss.backward()
                opt.step()
                torch.cuda.synchronize()
            ev = sorted(p.key_averages(), key=lambda e: -e.device_time_total)
            tot = sum(e.device_time_total for e in ev)
            top = [{"kernel": e.key[:120], "ms": e.device_time_total / 1e3, "calls": e.count,
                    "frac": e.device_time_total / max(tot, 1)} for e in ev[:25]]
        except Exception as e:                                             # noqa: BLE001
            top = [{"error": f"{type(e).__name__}: {str(e)[:200]}"}]
    return {"profile_top_kernels": top, "batch": B, "micro_batch": mb, "ctx": ctx, "tokens_per_step": B * ctx, "step_ms": med * 1e3,
            "tokens_per_s": B * ctx / med, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "loss_first": losses[0], "loss_last": losses[-1], "finite": all(map(lambda v: v == v, losses)),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "layer_types": list(cfg.layer_types)}


def main(out_dir=None, ctxs=(4096, 16384, 65536), warmup=2, steps=3, guard_s=40.0):
    res = {"what": "training throughput, small preset, one GPU (bench_e2e.py docstring)",
           "tokens_per_step": TOKENS_PER_STEP, "arms": {k: dict(v) for k, v in ARMS.items()}, "runs": {}}
    for ctx in ctxs:
        for arm, over in ARMS.items():
            key = f"{arm}_{ctx}"
            t0 = time.time()
            micro, tried = None, []
            while True:          # out of memory: halve the micro-batch (gradient accumulation, same tokens per step)
                try:
                    r = run_arm(over, ctx, warmup, steps, guard_s, micro=micro)
                except torch.cuda.OutOfMemoryError as e:
                    r = {"error": f"OutOfMemoryError: {str(e)[:200]}"}
                except Exception as e:                                     # noqa: BLE001
                    r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                B = max(1, TOKENS_PER_STEP // ctx)
                mb = micro or B
                if "OutOfMemoryError" not in r.get("error", "") or mb == 1:
                    break
                tried.append(mb)
                micro = mb // 2
                torch.cuda.empty_cache()
            if tried:
                r["oom_at_micro_batch"] = tried
            r["wall_s"] = time.time() - t0
            res["runs"][key] = r
            print("e2e", key, r, flush=True)
            torch.cuda.empty_cache()
            save("e2e", res, out_dir)
    for ctx in ctxs:
        a, d = res["runs"].get(f"v4-triton_{ctx}", {}), res["runs"].get(f"dense-sdpa_{ctx}", {})
        n = res["runs"].get(f"v4-torch_{ctx}", {})
        if "tokens_per_s" in a and "tokens_per_s" in d:
            res.setdefault("speedup_triton_vs_dense", {})[str(ctx)] = a["tokens_per_s"] / d["tokens_per_s"]
        if "tokens_per_s" in a and "tokens_per_s" in n:
            res.setdefault("speedup_triton_vs_torch", {})[str(ctx)] = a["tokens_per_s"] / n["tokens_per_s"]
    save("e2e", res, out_dir)
    return res


def extra(out_dir=None):
    """Follow-ups of the main table: the reference path at a batch that fits (4K, one sequence per step, both paths
    at that batch), the Triton path without the indexer KL, and a profile of one Triton-path step at 16K."""
    res = {"what": "bench_e2e.extra: reference path at batch 1, KL off, profile", "runs": {}}
    plan = [("v4-torch_b1_4096", dict(kernels="torch"), 4096, 4096, False),
            ("v4-triton_b1_4096", dict(kernels="triton"), 4096, 4096, True),
            ("v4-triton-nokl_16384", dict(kernels="triton", indexer_loss_weight=0.0), 16384, TOKENS_PER_STEP, False),
            ("v4-triton_16384_profiled", dict(kernels="triton"), 16384, TOKENS_PER_STEP, True)]
    for key, over, ctx, tokens, prof in plan:
        t0 = time.time()
        try:
            r = run_arm(over, ctx, 1, 3, 40.0, tokens=tokens, profile=prof)
        except Exception as e:                                             # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        r["wall_s"] = time.time() - t0
        res["runs"][key] = r
        print("e2e-extra", key, {k: v for k, v in r.items() if k != "profile_top_kernels"}, flush=True)
        for row in (r.get("profile_top_kernels") or [])[:15]:
            print("   ", row, flush=True)
        torch.cuda.empty_cache()
        save("e2e_extra", res, out_dir)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--extra", action="store_true", help="run extra() instead of the main table")
    a = ap.parse_args()
    print(env_info())
    extra(a.out) if a.extra else main(a.out, tuple(a.ctx), steps=a.steps)
