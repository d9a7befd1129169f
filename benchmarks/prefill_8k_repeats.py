"""The 8K CSA prefill of several bench_csa processes as one record: one sample per process, and its spread.

    python benchmarks/prefill_8k_repeats.py --out benchmarks/results/csa_8k_repeats.json \
        [--note TEXT] [--parts-only GROUP ...] [--with-record OLD.json ...] GROUP=csa.json [GROUP=csa.json ...]

At 8K the CSA chain's kernels take ~0.5 ms and its host enqueues them in 0.45-1.4 ms, depending on the machine and
the moment (benchmarks/README.md T2), so one process's eager figure samples the host as much as the kernels. Each
GROUP=PATH names a csa.json written by one process (`CSA_FAMILIES=prefill_8192 python benchmarks/run_all.py --only
csa`, or the whole family list); GROUP labels the samples that share a machine and a chain form. Per sample: the sum
of the separately timed parts (the summary key csa_prefill_8k_speedup_vs_sdpa_flash), the chain called end to end
(eager), eager queued behind a sleep (its launches on the GPU alone, common.bench_queued; records from before that
measurement have none; chain_queued_held: whether every timed call of both it and SDPA-flash's was queued in time,
None where the record does not say; bench_csa gives a queued speedup only where both were) and replayed from a CUDA
graph, and the chain's host time per call, each against SDPA-flash of the same process.
Per group and over all samples: n, median, min, max and how many samples read below 1.0x. --parts-only GROUP: that
group's chain was another form than the current one (bench_csa.prefill_chain changed since): its chain figures are
kept in each sample under "other_chain" and left out of the chain statistics. --with-record OLD.json: the samples
of an earlier such record come first, as they are (their groups, their "other_chain"); the statistics cover them too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from common import write_json

METRICS = ("by_parts_speedup", "chain_speedup", "chain_queued_speedup", "chain_graph_speedup", "chain_host_ms")
CHAIN = ("chain_ms", "chain_queued_ms", "chain_graph_ms", "chain_host_ms", "chain_speedup", "chain_queued_speedup",
         "chain_queued_held", "chain_graph_speedup")


def sample(group: str, path: str, parts_only: bool = False) -> dict:
    d = json.load(open(path))
    parts, chain = d["csa_prefill"]["triton_8192"], d["csa_prefill"].get("pipeline_8192", {})
    env = d.get("env", {})
    s = {"group": group, "file": os.path.basename(path), "time": env.get("time"), "gpu": env.get("gpu"),
         "code_tree": env.get("code_tree"),
         "by_parts_speedup": parts["speedup_vs_sdpa_flash"], "by_parts_ms": parts["ms"],
         "compressor_ms": parts["compressor_ms"], "indexer_ms": parts["indexer_ms"],
         "indexer_method": parts["indexer_method"], "sparse_ms": parts["sparse_ms"],
         "sdpa_flash_ms": parts["sdpa_flash_ms"],
         "chain_ms": chain.get("ms"), "chain_queued_ms": chain.get("queued", {}).get("ms"),
         "chain_graph_ms": chain.get("graph_ms"),
         "chain_host_ms": chain.get("host", {}).get("ms"),
         "chain_speedup": chain.get("speedup_vs_sdpa_flash"),
         "chain_queued_speedup": chain.get("queued_speedup_vs_sdpa_flash"),
         "chain_queued_held": (None if "queued" not in chain else
                               chain["queued"].get("held") is True and chain["sdpa_flash_queued"].get("held") is True),
         "chain_graph_speedup": chain.get("graph_speedup_vs_sdpa_flash")}
    if parts_only:
        s["other_chain"] = {k: s[k] for k in CHAIN}
        s.update(dict.fromkeys(CHAIN))
    return s


def spread(values: list) -> dict | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"n": len(v), "median": statistics.median(v), "min": min(v), "max": max(v),
            "below_1": sum(x < 1.0 for x in v)}


def build(pairs: list, note: str = "", parts_only=(), earlier=()) -> dict:
    """pairs [(group, path of a csa.json)] -> the record (module docstring); earlier: samples of earlier records, put
    first. A file without an 8K prefill record raises ValueError naming it."""
    samples = [dict(s) for s in earlier]
    for g, p in pairs:
        try:
            samples.append(sample(g, p, g in parts_only))
        except (KeyError, TypeError, ValueError) as e:     # ValueError: not JSON; KeyError / TypeError: no 8K entry
            raise ValueError(f"{p}: no 8K prefill record (csa_prefill.triton_8192): {type(e).__name__}: {e}") from e
    groups = list(dict.fromkeys(s["group"] for s in samples))
    stats = {m: {"all": spread([s.get(m) for s in samples]),
                 **{g: spread([s.get(m) for s in samples if s["group"] == g]) for g in groups}} for m in METRICS}
    for m in stats["chain_host_ms"].values():              # a time, not a speedup: no "below 1.0x" count
        if m:
            m.pop("below_1")
    parts_only = set(parts_only) | {s["group"] for s in earlier if "other_chain" in s}
    return {"what": "CSA prefill at 8K (B 1, H 16 x 128) against SDPA-flash, one sample per bench_csa process",
            "note": note, "groups": groups, "parts_only": sorted(parts_only), "stats": stats, "samples": samples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--parts-only", action="append", default=[], metavar="GROUP")
    ap.add_argument("--with-record", action="append", default=[], metavar="OLD.json")
    ap.add_argument("pairs", nargs="+", metavar="GROUP=PATH")
    a = ap.parse_args(argv)
    earlier = []
    for p in a.with_record:
        try:
            earlier += json.load(open(p))["samples"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"prefill_8k_repeats: --with-record {p!r}: not a record of this script ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return 2
    pairs = []
    for x in a.pairs:
        g, sep, p = x.partition("=")
        if not sep or not g or not os.path.isfile(p):
            print(f"prefill_8k_repeats: argument {x!r}: expected GROUP=PATH of an existing csa.json", file=sys.stderr)
            return 2
        pairs.append((g, p))
    for g in a.parts_only:
        if g not in {q for q, _ in pairs}:
            print(f"prefill_8k_repeats: --parts-only {g!r}: no such group among {sorted({q for q, _ in pairs})}",
                  file=sys.stderr)
            return 2
    try:
        rec = build(pairs, a.note, set(a.parts_only), earlier)
    except ValueError as e:
        print(f"prefill_8k_repeats: {e}", file=sys.stderr)
        return 2
    write_json(a.out, rec)                                  # atomically
    s = rec["stats"]["by_parts_speedup"]["all"]
    print(f"{a.out}: {s['n']} samples, by parts median {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}), "
          f"{s['below_1']} below 1.0x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
