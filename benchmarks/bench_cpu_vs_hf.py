"""CPU reference path against HF transformers `deepseek_v4`: forward + backward, same config and weights, side by side.

    python benchmarks/bench_cpu_vs_hf.py --out benchmarks/results/cpu_vs_hf.json          # ~5 min on 2 cores
    python benchmarks/bench_cpu_vs_hf.py --shapes 4x512 --repeats 3 --out /tmp/x.json    # quick look
    python benchmarks/bench_cpu_vs_hf.py --threads 1 --clock cpu --out /tmp/x.json        # A/B on a busy machine

Both models are built from one set of weights (ours -> HF through `dsv4_lab.interop.to_hf`, docs/hf_parity.md §E):
a 3.2M-parameter SWA / CSA / HCA / CSA model with one hash-routed MoE layer, mHC with 4 streams, fp32. Both run
eager on the CPU with `torch.set_num_threads(threads)` (default 2): HF with `_attn_implementation="eager"` and its
default experts backend; ours with `kernels="torch"` (the naive reference path every CPU run takes).

What is timed, per side and step: `zero_grad`, the forward on ids (B, T), the cross-entropy of the logits against
the next tokens, and the backward, in train mode. Both sides compute the same function: our config adds HF-compat
flags (docs/hf_parity.md §E.3) and turns off the two training losses HF does not have (the indexer KL,
`indexer_loss_weight=0`, and the sequence balance loss, `balance_loss_weight=0`). The run also times our model with
those losses on (`ours_train_losses`, its default training step), for information; the comparison uses the
matched step.

Protocol: one warm-up step per side and shape, then `--repeats` rounds; each round times both sides once, in an
order that alternates between rounds, so load on the machine hits both alike. Reported: median, min and max ms per
side, and the ratio ours / HF of the medians (target <= 0.8) with the range of the per-round ratios. Before timing,
the logits of the two models are compared (eval mode, no grad) on the benchmark's first shape: a gap far above
1e-4 would mean the two sides do not compute the same model.

Output: the JSON (`--out`) with env (torch / transformers versions, threads, CPU, git commit), config, per shape the
timings, and a text log beside it (same name, `.log`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch                                                          # noqa: E402
import torch.nn.functional as F                                       # noqa: E402

from dsv4_lab.config import ModelConfig                               # noqa: E402
from dsv4_lab.model import DSV4LM                                     # noqa: E402
from dsv4_lab.runlog import commit_label                               # noqa: E402

# the compared model: SWA / CSA / HCA / CSA, hash-routed first MoE layer, mHC (docs §1, §2, §3, §5)
CONFIG = dict(
    vocab_size=256, d_model=256, layer_types=["swa", "csa", "hca", "csa"], max_seq_len=2048,
    n_heads=4, head_dim=64, rope_head_dim=32, q_lora_rank=128, o_groups=2, o_lora_rank=128, window=64,
    yarn_original_seq_len=128, csa_ratio=4, hca_ratio=16, index_n_heads=16, index_head_dim=32, index_topk=64,
    residual="mhc", hc_mult=4, hc_sinkhorn_iters=20, ffn="moe", n_routed_experts=8, n_activated_experts=2,
    n_shared_experts=1, moe_inter_dim=64, n_hash_layers=1, mtp_depth=0,
    # HF-compat (docs/hf_parity.md §E.3) and the CPU reference path
    quant="none", shared_expert_clamp=True, index_hadamard=False, anticipatory="off", kernels="torch",
    # the training losses HF does not compute (turned on again for the `ours_train_losses` row)
    indexer_loss_weight=0.0, balance_loss_weight=0.0)


def parse_shape(s: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in s.lower().split("x"))
    except ValueError:
        b = t = 0
    if b <= 0 or t <= 1 or t > CONFIG["max_seq_len"]:
        print(f"--shapes entry {s!r} is not allowed: BxT with B >= 1 and 2 <= T <= {CONFIG['max_seq_len']}",
              file=sys.stderr)
        sys.exit(2)
    return b, t


def build_models(seed: int):
    """(ours, hf): one set of random weights, placeholders randomised so no code path is trivially zero."""
    from dsv4_lab.interop import to_hf
    torch.manual_seed(seed)
    ours = DSV4LM(ModelConfig(**CONFIG)).float()
    with torch.no_grad():
        for name, p in ours.named_parameters():                      # sinks, compressor slot bias, router bias
            if name.endswith(("attn_sink", "ape", "e_score_correction_bias")):
                p.normal_(0, 0.5 if not name.endswith("bias") else 0.05)
    hf = to_hf(ours)
    return ours.train(), hf.train()


def step_fn(model, ids: torch.Tensor, targets: torch.Tensor, is_hf: bool):
    """One timed step: zero_grad, forward, cross-entropy (+ our aux losses when switched on), backward."""
    def run():
        model.zero_grad(set_to_none=True)
        if is_hf:
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        else:
            loss = model(ids, targets=targets).loss                   # lm loss + weighted aux losses (if any)
        loss.backward()
    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def time_once(fn) -> float:
    t0 = CLOCK()
    fn()
    return (CLOCK() - t0) * 1e3


def logits_gap(ours, hf, ids: torch.Tensor) -> float:
    ours.eval(), hf.eval()
    with torch.no_grad():
        a, b = ours(ids).logits, hf(input_ids=ids, use_cache=False).logits
    ours.train(), hf.train()
    return ((a - b).abs().max() / b.abs().max()).item()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "n/a"


def summary(ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2),
            "all_ms": [round(v, 2) for v in ms]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_vs_hf.json"))
    ap.add_argument("--shapes", default="4x512,1x2048", help="comma list of BxT")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (each: both sides once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", default="wall", help="wall (the target's measure) | cpu (process CPU time: with "
                    "--threads 1 it counts work only, a steadier A/B measure on a machine shared with other jobs)")
    ap.add_argument("--no-train-losses", action="store_true", help="skip the informational ours_train_losses row")
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.threads < 1:
        print(f"--repeats = {a.repeats} / --threads = {a.threads} is not allowed: both >= 1", file=sys.stderr)
        return 2
    if a.clock not in CLOCKS:
        print(f"--clock = {a.clock!r} is not allowed: one of {sorted(CLOCKS)}", file=sys.stderr)
        return 2
    global CLOCK
    CLOCK = CLOCKS[a.clock]
    shapes = [parse_shape(s) for s in a.shapes.split(",") if s]
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        print(f"--out {a.out!r} is not allowed: its folder does not exist", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    import transformers
    log_lines: list[str] = []

    def log(msg: str):
        print(msg, flush=True)
        log_lines.append(msg)

    ours, hf = build_models(a.seed)
    n_params = ours.num_params(exclude_embedding=False)
    hf_params = sum(p.numel() for p in hf.parameters())
    experts_impl = getattr(hf.config, "_experts_implementation", None)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "clock": a.clock, "loadavg_start": os.getloadavg(), "commit": commit_label(ROOT, short=True) or "unknown (no git)",
           "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "hf_attn_implementation": hf.config._attn_implementation, "hf_experts_implementation": experts_impl}
    log(f"env {json.dumps(env)}")
    log(f"params ours {n_params} HF {hf_params}")
    g = torch.Generator().manual_seed(a.seed)
    B0, T0 = shapes[0]
    gap = logits_gap(ours, hf, torch.randint(0, CONFIG["vocab_size"], (B0, T0), generator=g))
    log(f"logits gap ours vs HF at {B0}x{T0} (eval, no grad): {gap:.3g}")

    results = []
    for B, T in shapes:
        ids = torch.randint(0, CONFIG["vocab_size"], (B, T + 1), generator=g)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        sides = {"ours": step_fn(ours, x, y, False), "hf": step_fn(hf, x, y, True)}
        for name, fn in sides.items():                                # warm-up
            log(f"{B}x{T} warm-up {name}: {time_once(fn):.1f} ms")
        times: dict[str, list[float]] = {k: [] for k in sides}
        ratios = []
        for r in range(a.repeats):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            got = {k: time_once(sides[k]) for k in order}
            for k, v in got.items():
                times[k].append(v)
            ratios.append(got["ours"] / got["hf"])
            log(f"{B}x{T} round {r}: ours {got['ours']:.1f} ms, HF {got['hf']:.1f} ms, ratio {ratios[-1]:.3f}")
        row = {"shape": f"{B}x{T}", "batch": B, "seq_len": T, "ours": summary(times["ours"]),
               "hf": summary(times["hf"]),
               "ratio_of_medians": round(statistics.median(times["ours"]) / statistics.median(times["hf"]), 3),
               "ratio_per_round": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                   "max": round(max(ratios), 3)}}
        if not a.no_train_losses:                                     # informational: our default training step
            ours.cfg.indexer_loss_weight, ours.cfg.balance_loss_weight = 1.0, 1e-4
            fn = step_fn(ours, x, y, False)
            fn()
            tl = [time_once(fn) for _ in range(max(1, a.repeats // 2))]
            ours.cfg.indexer_loss_weight, ours.cfg.balance_loss_weight = 0.0, 0.0
            row["ours_train_losses"] = summary(tl)
            log(f"{B}x{T} ours with indexer KL + balance loss: median {statistics.median(tl):.1f} ms")
        row["target_met"] = row["ratio_of_medians"] <= 0.8
        log(f"{B}x{T}: ours {row['ours']['median_ms']} ms vs HF {row['hf']['median_ms']} ms (medians of "
            f"{a.repeats}), ratio {row['ratio_of_medians']} (per round {row['ratio_per_round']['min']}.."
            f"{row['ratio_per_round']['max']}), target <= 0.8 {'met' if row['target_met'] else 'MISSED'}")
        results.append(row)
    env["loadavg_end"] = os.getloadavg()
    doc = {"what": "forward + backward (train mode, cross-entropy), CPU, fp32, eager, ours vs HF deepseek_v4",
           "target": "ours / HF <= 0.8 at every shape", "env": env, "config": CONFIG, "params": n_params,
           "logits_gap_rel": gap, "repeats": a.repeats, "results": results}
    from dsv4_lab.runlog import atomic_write_bytes
    atomic_write_bytes(a.out, (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write_bytes(os.path.splitext(a.out)[0] + ".log", ("\n".join(log_lines) + "\n").encode())
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
