"""How often the split sieve's guess misses (indexer_topk/sieve.py, split form), on the CPU: the guess emulated in
PyTorch on long score rows whose neighbouring entries are alike, for each sample form.

The split form guesses the threshold tau from NS blocks of SB contiguous entries spread over the row (the key of
rank r = ceil((k + CAND) / 2 x NS SB / n) among them, its top 16 key bits kept) and takes the fast path only when
k <= #(entries with key >= tau) <= CAND; otherwise one program streams the whole row (the fallback). Over independent
scores the count's relative spread is ~1 / sqrt(r) whatever SB is; over scores correlated along the row the SB
entries of a block are nearly one draw, so blocks of SB > 1 sample fewer independent values and the count spreads
wider. Rows here: moving averages of N(0, 1) over `window` neighbours (window 1: independent), n = L entries.

Emulation, not the kernel: keys as select.py's _ukey orders them (sign-flipped magnitudes; -0.0 never occurs here),
the sample positions and rank as sieve.py's _sample computes them. bench_csa.py's topk_row runs the kernel itself on
20 such rows per sample form on the GPU (`sieve_fp32_corr16_*_fallbacks_of_20`).

    python benchmarks/probe_sieve_guess.py [--rows 1000] [--out benchmarks/results/sieve_guess.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, write_json  # noqa: E402

L, K, CAND, GUESS_BITS = 262144, 512, 4096, 16        # one 1M-context decode row, the split form's defaults
WINDOWS = (1, 4, 16, 64)
SAMPLES = ((512, 8), (1024, 4), (2048, 2), (4096, 1))


def keys(x: torch.Tensor) -> torch.Tensor:
    """Signed int32 keys in the order of the fp32 values x (select.py _ukey with its sign bit flipped back)."""
    b = x.contiguous().view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def passed(x: torch.Tensor, ns: int, sb: int) -> int:
    """#entries of the row x at or above the split form's guess from NS = ns blocks of SB = sb entries."""
    n = x.numel()
    j = torch.arange(ns * sb)
    s = keys(x[(j // sb) * (n - sb) // (ns - 1) + j % sb])
    r = min(((K + CAND) // 2 * ns * sb + n - 1) // n, ns * sb)
    sh = 32 - GUESS_BITS
    tau = int(torch.sort(s >> sh, descending=True).values[r - 1]) << sh
    return int((keys(x) >= tau).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "sieve_guess.json"))
    a = ap.parse_args(argv)
    if a.rows < 1:
        print(f"probe_sieve_guess: --rows {a.rows}; allowed: >= 1", file=sys.stderr)
        raise SystemExit(2)
    g = torch.Generator().manual_seed(0)
    res = {}
    for w in WINDOWS:
        counts = {f: [] for f in SAMPLES}
        for _ in range(a.rows):
            z = torch.randn(L + w - 1, generator=g)
            x = z.unfold(0, w, 1).mean(-1) if w > 1 else z              # (L,) w-neighbour moving averages
            for f in SAMPLES:
                counts[f].append(passed(x, *f))
        for (ns, sb), c in counts.items():
            c = torch.tensor(c, dtype=torch.float64)
            res[f"window{w}_s{ns}x{sb}"] = {
                "count_mean": round(c.mean().item(), 1), "count_std": round(c.std().item(), 1),
                "count_min": int(c.min()), "count_max": int(c.max()),
                "fallback_share": ((c < K) | (c > CAND)).double().mean().item(), "rows": a.rows}
    write_json(a.out, {"env": env_info(), "L": L, "k": K, "cand": CAND, "guess_bits": GUESS_BITS,
                       "note": "fallback_share: rows whose count of entries >= the guess lies outside [k, cand]",
                       "sieve_guess": res})
    for tag, r in res.items():
        print(f"{tag:22s} count {r['count_mean']:7.1f} +- {r['count_std']:6.1f}  fallback {r['fallback_share']:.3f}")


if __name__ == "__main__":
    main()
