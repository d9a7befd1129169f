"""Does compile=blocks compute the same training step as eager? A step-by-step diagnosis of loss parity's gap.

bench_loss_parity.py finds compiled training (`compile=blocks`) ending above the eager runs after 200 steps of
`small`. This benchmark looks at single steps instead. One model trains eagerly (the loss-parity setup: `small`,
its optimizer and learning-rate schedule, the bias updates after each step, bf16 autocast on CUDA); at chosen steps a
second copy compiled block by block (dsv4_lab/compilation.py) is loaded with the eager model's weights and buffers
and runs the same batch. Per checked step it records
    the loss terms (LM loss and every auxiliary loss) of: eager fp32, eager bf16, compiled bf16
    per parameter the relative gradient error ||g - g_fp32|| / ||g_fp32|| of eager bf16 (the rounding scale) and of
        compiled bf16 (both against eager fp32), and of compiled against eager bf16
    per MoE layer the expert loads the forward counted (`load_accum`, the input of the bias update) and
        `load_max_over_mean`, eager bf16 against compiled
Both kernel settings can be checked (`--kernels torch triton`): compiled naive PyTorch twins against compiled
Triton kernels separate "Inductor on this device" from "hand-written kernels inside Inductor".
Writes benchmarks/results/compile_parity.json (or --out) atomically: per kernels setting, per checked step, the
loss terms, the 12 largest gradient errors, the largest errors by parameter group, `off_groups` (per group, the
parameters beyond the GPU gradient test's bound: compiled error > 5 x eager bf16's + 0.1 where eager bf16's own is
below 0.02; empty = the compiled step is eager's up to rounding), the loads of eager fp32 / eager bf16 / compiled,
`flipped_experts` (experts whose token count differs between those three runs: a routing pick flipped) and
`off_flipped` (parameters beyond the bound that belong to a flipped expert: counted apart, not in `off_groups`).

    python benchmarks/bench_compile_parity.py [--preset small] [--seq 4096] [--batch 2] [--steps 0 1 5 20 40]
                                              [--kernels triton] [--set KEY=VALUE ...] [--out FILE]
    python benchmarks/bench_compile_parity.py --preset tiny --seq 128 --batch 2 --steps 0 2 --kernels torch  # CPU
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from dsv4_lab import DSV4LM, compilation  # noqa: E402
from dsv4_lab.config import parse_overrides  # noqa: E402
from dsv4_lab.data import Batches  # noqa: E402
from dsv4_lab.runlog import environment, save_json  # noqa: E402
from dsv4_lab.train import build_optimizer, call_step_hooks, lr_at  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from numerics import compiled_bf16_grad_bound  # noqa: E402  (the GPU gradient test's bound)


def group_of(name: str) -> str:
    """blocks.3.attn.indexer.wq.weight -> attn.indexer.wq.weight, mtp.layers.0.x -> mtp.x (layer and expert numbers dropped)."""
    name = re.sub(r"\.experts\.\d+\.", ".experts.*.", name)
    return re.sub(r"^mtp\.layers\.\d+\.", "mtp.", re.sub(r"^blocks\.\d+\.", "", name))


def run_once(model, ids, tgt, device, bf16):
    """One forward + backward; returns (loss terms, gradients by name, MoE loads and max/mean by layer)."""
    for m in model.modules():
        if hasattr(m, "load_accum"):
            m.load_accum.zero_()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, tgt)
    out.loss.backward()
    terms = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item()}
    terms.update({k: float(v.detach()) for k, v in out.aux.items() if k.endswith("_loss")})
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = {n: {"load": m.load_accum.tolist(),
                 "max_over_mean": float(m.stats["load"].max() / m.stats["load"].mean())}
             for n, m in model.named_modules() if hasattr(m, "load_accum") and m.stats}
    return terms, grads, loads


def expert_of(name: str) -> tuple[str, int] | None:
    """blocks.2.ffn.experts.14.w1.weight -> ("blocks.2.ffn", 14); None for a parameter of no routed expert."""
    m = re.match(r"^(.*)\.experts\.(\d+)\.", name)
    return (m.group(1), int(m.group(2))) if m else None


def flipped_experts(*loads: dict) -> set:
    """(MoE layer, expert) pairs whose token count differs between runs ({layer: {"load": [...]}} each): a routing
    pick flipped between them (bf16 rounds the router's input; a token with near-tied expert scores changes expert).
    Such an expert's gradient sums other tokens, so its error says nothing of the compiled code."""
    out = set()
    for n in loads[0]:
        counts = [lo[n]["load"] for lo in loads if lo.get(n)]
        out |= {(n, e) for e, c in enumerate(zip(*counts)) if len(set(c)) > 1}
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(eager, comp, ids, tgt, device, amp: bool) -> dict:
    comp.load_state_dict(eager.state_dict())                       # same weights, router biases, snapshots
    ref_t, ref_g, ref_l = run_once(eager, ids, tgt, device, False)
    own_t, own_g, own_l = run_once(eager, ids, tgt, device, amp)
    got_t, got_g, got_l = run_once(comp, ids, tgt, device, amp)
    eager.zero_grad(set_to_none=True)
    comp.zero_grad(set_to_none=True)
    if ref_g.keys() != got_g.keys():
        return {"error": f"gradients of different parameters: {sorted(ref_g.keys() ^ got_g.keys())}"}
    flipped = flipped_experts(ref_l, own_l, got_l)
    rows, groups = [], {}
    for n, r in ref_g.items():
        e_own, e_got, e_pair = rel(own_g[n], r), rel(got_g[n], r), rel(got_g[n], own_g[n])
        rows.append({"param": n, "eager_bf16": round(e_own, 5), "compiled": round(e_got, 5),
                     "compiled_vs_eager_bf16": round(e_pair, 5), "norm": round(r.norm().item(), 6)})
        g = groups.setdefault(group_of(n), {"n": 0, "eager_bf16": 0.0, "compiled": 0.0})
        g["n"] += 1
        g["eager_bf16"] = max(g["eager_bf16"], round(e_own, 5))
        g["compiled"] = max(g["compiled"], round(e_got, 5))
        if e_got > compiled_bf16_grad_bound(e_own):             # the GPU gradient test's bound
            key = "off_flipped" if expert_of(n) in flipped else "off"
            g[key] = g.get(key, 0) + 1
    # a gradient the compiled step gets wrong: far above the rounding error the eager bf16 step makes
    rows.sort(key=lambda r: r["compiled"] - 3 * r["eager_bf16"], reverse=True)
    loads = {n: {"eager_fp32": ref_l.get(n), "eager": own_l[n], "compiled": got_l.get(n)} for n in own_l}
    load_diff = {n: sum(abs(a - b) for a, b in zip(v["eager"]["load"], v["compiled"]["load"]))
                 for n, v in loads.items() if v["compiled"]}
    off = {k: v["off"] for k, v in groups.items() if v.get("off")}
    off_flipped = {k: v["off_flipped"] for k, v in groups.items() if v.get("off_flipped")}
    return {"terms": {"eager_fp32": ref_t, "eager_bf16": own_t, "compiled_bf16": got_t}, "off_groups": off,
            "off_flipped": off_flipped, "flipped_experts": sorted(f"{m}.experts.{e}" for m, e in flipped),
            "worst": rows[:12], "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["compiled"])),
            "load_abs_diff": load_diff, "loads": loads}


def check(kernels: str, a, device) -> dict:
    mc, tc = parse_overrides([f"preset={a.preset}", f"seq_len={a.seq}", f"batch_size={a.batch}",
                              f"max_steps={a.max_steps}", f"kernels={kernels}", "compile=false", "seed=0", *a.set])
    torch.manual_seed(tc.seed)
    eager = DSV4LM(mc).to(device).train()
    comp = DSV4LM(mc).to(device).train()
    compilation.compile_model(comp, regional=True)
    opt = build_optimizer(eager, tc)
    batches = Batches(tc.data, tc.seq_len, tc.batch_size, tc.seed)
    amp = device.type == "cuda"
    res, t0 = {"config": {"model": mc.to_dict(), "train": tc.to_dict()}, "steps": {}}, time.time()
    for step in range(max(a.steps) + 1):
        ids, tgt = (t.to(device) for t in batches.train_batch(step))
        if step in a.steps:
            res["steps"][str(step)] = compare(eager, comp, ids, tgt, device, amp)
            s = res["steps"][str(step)]
            w = s.get("worst", [{}])[0]
            print(f"{kernels} step {step}: parameters beyond the bound by group {s.get('off_groups')}; on experts "
                  f"whose picks flipped {s.get('off_flipped')} ({len(s.get('flipped_experts', []))} flipped)", flush=True)
            print(f"{kernels} step {step}: loss {s['terms']['eager_bf16']['loss']:.4f} eager / "
                  f"{s['terms']['compiled_bf16']['loss']:.4f} compiled; worst {w.get('param')} compiled "
                  f"{w.get('compiled')} eager_bf16 {w.get('eager_bf16')}; {time.time() - t0:.0f} s", flush=True)
        for g in opt.param_groups:                                  # the eager model takes the training step
            g["lr"] = lr_at(step, tc) * g.get("lr_mult", 1.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = eager(ids, tgt)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        call_step_hooks(eager, step, out.loss.item())
    res["dynamo_counters"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in
                              ("stats", "graph_break", "recompiles")}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 1, 5, 20, 40])
    ap.add_argument("--max-steps", type=int, default=200, help="the schedule's horizon (loss parity's run length)")
    ap.add_argument("--kernels", nargs="+", default=["triton"], choices=["torch", "triton", "auto"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compile_parity.json"))
    a = ap.parse_args(argv)
    if min(a.steps) < 0:
        ap.error(f"--steps {a.steps}: steps are >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"benchmark": "compile_parity", "preset": a.preset, "overrides": a.set, "seq": a.seq, "batch": a.batch, "steps": a.steps,
           "env": environment(device), "kernels": {}}
    for k in a.kernels:
        res["kernels"][k] = check(k, a, device)
        save_json(res, a.out)                                       # atomic: a finished setting is kept
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
