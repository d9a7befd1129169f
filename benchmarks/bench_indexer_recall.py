"""Indexer top-k recall when the index scores are stored in less precision (docs/kernels.md §3; the paper: index
scores FP32 -> BF16 make the top-k selector 2x faster at 99.7 % KV recall).

For one query row, the lightning indexer scores every visible compressed entry s:
    I_s = sum_h w_h ReLU(q_h . k_s)          q (HI, DI), w (HI,), k (S, DI)          (docs §2.4)
and CSA attends to the top k. This measures how many of the exact top k (scores in fp64) a selector keeps when it
ranks the scores rounded to fp32, bf16, fp16 or fp8 E4M3 (per-row scale: amax / 448), as a function of the number of
visible entries S, at the index shapes of the `flash` (HI 64, DI 128, k 512) and `small` (HI 4, DI 64, k 512)
presets. Recall is the expected fraction of the exact top-k set kept when ties at the k-th value are broken at random
(rounding creates ties; `expected_recall`), so it does not depend on which tied entry a kernel happens to pick;
where the exact k-th value is itself tied (few heads: many scores are exactly 0 after the ReLU) the exact set is the
entries strictly above it.

Inputs are random (q, k ~ N(0, 1/DI), w ~ N(0, 1/HI); one key set shared by all rows, S its first entries, as the
visible prefix grows with the context): the claim boundary is this score distribution, not a trained model's. CPU,
about a minute; writes benchmarks/results/indexer_recall.json, from which `make reproduce` draws
figures/indexer_recall.png (dsv4_lab/figures/indexer_recall.py).

    python benchmarks/bench_indexer_recall.py [--rows 8] [--lengths 2048 8192 32768 131072 262144]
        [--presets flash small] [--seed 0] [--out benchmarks/results/indexer_recall.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4_lab.config import ModelConfig  # noqa: E402
from dsv4_lab.runlog import environment, save_json  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16", "fp8_e4m3")
E4M3_MAX = 448.0


def rounded(scores: torch.Tensor, precision: str) -> torch.Tensor:
    """fp64 scores (S,) as a selector would see them stored in `precision` (back in fp64, same order)."""
    if precision == "fp8_e4m3":                   # per-row scale so the largest |score| maps to the format's max
        scale = scores.abs().max().clamp_min(1e-300) / E4M3_MAX
        return (scores / scale).to(torch.float8_e4m3fn).to(torch.float64) * scale
    return scores.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]).double()


def expected_recall(exact: torch.Tensor, approx: torch.Tensor, k: int) -> tuple[float, int]:
    """(recall, n): the expected fraction of the exact top-k set that a top-k of `approx` keeps when its ties at the
    k-th largest value are broken uniformly at random (entries above that value are always picked, each tied entry
    with probability free slots / tied entries). The exact set: the entries of `exact` at or above its k-th largest
    value; when that value is itself tied (e.g. many scores exactly 0 after the ReLU), only those strictly above
    it, since any choice among the tied ones is as exact as another. n = the exact set's size (0: recall is nan)."""
    te = torch.topk(exact, k).values[-1]
    ref = exact >= te if int((exact >= te).sum()) == k else exact > te
    n = int(ref.sum())
    if n == 0:
        return float("nan"), 0
    t = torch.topk(approx, k).values[-1]          # the k-th largest value: the same whatever the order of ties
    above, tied = approx > t, approx == t
    p_pick = above.double() + tied.double() * (k - int(above.sum())) / int(tied.sum())
    return float(p_pick[ref].sum()) / n, n


def measure(preset: str, lengths, rows: int, seed: int, log=print) -> list[dict]:
    cfg = ModelConfig.from_preset(preset)
    HI, DI, k = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(max(lengths), DI, generator=g, dtype=torch.float64) / DI ** 0.5           # (S_max, DI)
    q = torch.randn(rows, HI, DI, generator=g, dtype=torch.float64) / DI ** 0.5                 # (R, HI, DI)
    w = torch.randn(rows, HI, generator=g, dtype=torch.float64) / HI ** 0.5                     # (R, HI)
    out = []
    for S in lengths:
        if S <= k:
            continue
        rec, sizes = {p: [] for p in PRECISIONS}, []
        t0 = time.time()
        for r in range(rows):
            scores = w[r] @ torch.relu(q[r] @ keys[:S].T)                                    # (S,) fp64
            for p in PRECISIONS:
                value, n = expected_recall(scores, rounded(scores, p), k)
                rec[p].append(value)
            sizes.append(n)
        for p in PRECISIONS:
            v = [x for x in rec[p] if x == x]
            out.append({"preset": preset, "index_n_heads": HI, "index_head_dim": DI, "k": k, "S": S,
                        "precision": p, "rows": len(v), "recall_mean": sum(v) / len(v) if v else None,
                        "recall_min": min(v) if v else None, "recall_per_row": v, "exact_set_sizes": sizes})
        log(f"[recall] {preset} S={S}: " + ", ".join(f"{r['precision']} {r['recall_mean']:.4f}" for r in out[-4:]
                                                   if r["recall_mean"] is not None)
            + f"; exact set {min(sizes)}-{max(sizes)} entries ({time.time() - t0:.1f} s)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072, 262144])
    ap.add_argument("--presets", nargs="+", default=["flash", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "indexer_recall.json"))
    a = ap.parse_args(argv)
    if a.rows < 1 or min(a.lengths) < 1:
        print(f"bench_indexer_recall: --rows {a.rows} / --lengths {a.lengths} are not allowed: positive integers",
              file=sys.stderr)
        return 2
    try:
        for p in a.presets:
            ModelConfig.from_preset(p)
    except Exception as e:                          # an unknown preset: its one-line ConfigError
        print(f"bench_indexer_recall: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [r for p in a.presets for r in measure(p, sorted(a.lengths), a.rows, a.seed)]
    save_json({"what": "expected top-k recall of the exact (fp64) indexer picks when scores are stored in less "
                       "precision (benchmarks/bench_indexer_recall.py)",
               "env": environment("cpu"), "seed": a.seed, "precisions": list(PRECISIONS), "rows": rows}, Path(a.out))
    out = Path(a.out).resolve()
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"bench_indexer_recall: {len(rows)} points -> {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
