"""Margins of the numerical tests: each factored comparison over many seeds, worst error / tolerance (tests/README.md).

    python scripts/tolerance_margins.py --seeds 20        # the table committed in tests/README.md
    python scripts/tolerance_margins.py --quick           # 2 seeds

The comparisons are the tests' own `check_*` functions (tests/test_decode.py, test_optim.py, test_attention.py,
test_hf_parity.py, test_mtp.py, test_mhc.py, test_moe.py, test_dense_sink_attention.py, test_flex_baseline.py,
test_longctx.py, test_rope.py, test_prefix_store.py, test_train.py, test_parallel.py), the kernel interpreter cases
(tests/kernels_cases.py, whose `_check` calls are recorded) and the interpreter scripts that print their comparisons
(test_hca_prefill_interpret.py, kernel_wiring_check.py); each gives (name, error, tolerance) with the error model
written beside the tolerance. Prints a markdown table sorted by worst
ratio and exits 1 if any comparison's worst error exceeds 0.5 x its tolerance (a test that passes by luck), 2 on bad
arguments. Kernel cases and interpreter scripts run once (fixed inputs: the Triton interpreter takes ~2 min per pass
on one core); `--no-kernels` skips them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
LIMIT = 0.5


def seeded_checks():
    """(label, fn(seed) -> [(name, err, tol)]) for every seeded comparison."""
    import test_decode as D
    import test_optim as O
    out = [(f"decode {n}", lambda s, n=n: D.check_cached_vs_full(n, s)) for n in D.CONFIGS]
    out.append(("decode lossy", D.check_lossy_storage))
    out += [(f"NS {sh}", lambda s, sh=sh: O.check_ns_singular_values(sh, s)) for sh in O.WELL_CONDITIONED]
    out.append(("Muon vs torch", lambda s: O.check_muon_vs_torch(8 + s)))
    out.append(("NS polar", O.check_polar))
    out.append(("NS batched", O.check_batched_and_tall))
    out += [(f"Muon rms {sh}", lambda s, sh=sh: O.check_update_rms(sh, s)) for sh in O.RMS_SHAPES]
    out.append(("Muon stacked", O.check_stacked_experts))
    out.append(("Muon row groups", O.check_grouped_rows))
    out.append(("NS keller5 band", O.check_keller5_band))
    out.append(("NS tiny singular values", O.check_tiny_singular_values))
    out.append(("Muon momentum", O.check_momentum))
    import test_attention as A
    out += [(f"attention causality {k} T={T}", lambda s, k=k, T=T: A.check_causality(k, T, s))
            for k in A.TYPES for T in (23, 45)]
    out.append(("attention causality full model", A.check_causality_full_model))
    out += [(f"attention spec loop {A.variant_id(kw)}", lambda s, kw=kw: A.check_spec_loop(kw, s))
            for kw in A.SPEC_VARIANTS]
    out.append(("attention spec loop no entries", A.check_no_visible_entries))
    out += [(f"attention spec loop ratios {c}/{h}", lambda s, c=c, h=h: A.check_ratios(c, h, s)) for c, h in A.RATIOS]
    out += [(f"attention HF heads={h} k={k}", lambda s, h=h, k=k: A.check_hf_parity_attention_layers(h, k, s))
            for h, k in ((16, 3), (4, 64))]
    out.append(("attention spec loop sensitive", A.check_spec_loop_sensitive))
    out.append(("attention overlap halves", A.check_overlap_halves))
    out.append(("attention compressor bf16 projection", A.check_bf16_projection))
    out.append(("attention Hadamard", A.check_hadamard))
    out.append(("attention index scores", A.check_index_scores))
    out.append(("attention toggle overlap off", A.check_overlap_off_is_hca))
    out.append(("attention toggle sink off", A.check_sink_off))
    out.append(("attention toggle grouped output off", A.check_grouped_output_off))
    out.append(("attention toggle output RoPE off", A.check_output_rope_off))
    out.append(("attention index all", lambda s: A.check_index_all(s)[0]))
    out.append(("attention index oracle", A.check_oracle_mode))
    out.append(("attention indexer KL", A.check_indexer_kl))
    out.append(("attention indexer loss recorded", lambda s: A.check_indexer_loss_recorded(s)[0]))
    out.append(("attention indexer modes differ", lambda s: A.check_modes_differ(s)[0]))
    import test_hf_parity as HF
    out += [(f"HF parity {c}", lambda s, c=c: HF.check_logits_match_hf(c, s)) for c in HF.CASES]
    out.append(("HF parity shared clamp", lambda s: HF.check_shared_expert_clamp(1 + s)))
    out.append(("HF parity round trip", lambda s: HF.check_to_hf_round_trip(2 + s)))
    import test_mtp as MT
    out += [(f"MTP ce depth {d}", lambda s, d=d: MT.check_mtp_ce(d, s)) for d in (1, 2)]
    out.append(("MTP loss weight", lambda s: MT.check_loss_weight(s)[0]))
    out.append(("MTP position", MT.check_mtp_position))
    import test_mhc as MH
    out += [(f"mHC sinkhorn x{sh:g}", lambda s, sh=sh: MH.check_sinkhorn(sh, 1 + s)) for sh in MH.SHARPS]
    out.append(("mHC comb", MH.check_comb))
    out.append(("mHC post/pre", MH.check_post_pre))
    out += [(f"mHC one stream {r}", lambda s, r=r: MH.check_one_stream(r, s)) for r in ("hc", "mhc")]
    out.append(("mHC HC unconstrained", MH.check_hc_unconstrained))
    out.append(("mHC init", MH.check_init))
    out.append(("mHC probes", lambda s: MH.check_probes(s)[0]))
    out.append(("mHC kernel path (interpreter)", MH.check_kernel_path))
    import test_moe as MO
    out += [(f"MoE per-token {MO.variant_id(kw)}", lambda s, kw=kw: MO.check_per_token_reference(kw, s))
            for kw in MO.REF_VARIANTS]
    out += [(f"MoE grouped {c}", lambda s, c=c: MO.check_grouped_dispatch(c, s)) for c in MO.GROUPED_CASES]
    out.append(("MoE bias weights", MO.check_bias_weights))
    out += [(f"MoE clamp shared={c}", lambda s, c=c: MO.check_clamp(c, s)) for c in (False, True)]
    out.append(("MoE dense SwiGLU", MO.check_dense_swiglu))
    out.append(("MoE balance loss", lambda s: MO.check_balance_loss(s)[0]))
    out.append(("MoE anticipatory", lambda s: MO.check_anticipatory(s)[0]))
    out.append(("MoE either dispatch", MO.check_either_dispatch))
    import test_dense_sink_attention as DS
    out += [(f"dense sink fp64 {c[:2]}", lambda s, c=c: DS.check_fp64(*c, seed=s)) for c in DS.FP64_CASES]
    out.append(("dense sink fp32", lambda s: DS.check_fp32(seed=s)))
    import test_flex_baseline as FX
    out += [(f"flex HCA {sh}", lambda s, sh=sh: FX.check_flex_hca(*sh, seed=s)) for sh in FX.FLEX_SHAPES]
    import test_longctx as LC
    out.append(("long context RoPE table length", LC.check_rope_table_length))
    import test_rope as RP
    out += [(f"RoPE {str(d)[6:]} {sh} inverse={inv}", lambda s, d=d, sh=sh, inv=inv: RP.check_rotation(d, sh, inv, s))
            for d in RP.DTYPES for sh in RP.SHAPES for inv in (False, True)]
    out.append(("RoPE non-contiguous", RP.check_non_contiguous))
    import test_prefix_store as PS
    out.append(("prefix store roundtrip", PS.check_prefix_roundtrip))
    out += [(f"prefix store rebuilt {p}", lambda s, p=p, e=e: PS.check_rebuilt_state(p, e, s)) for p, e in PS.POLICIES]
    out.append(("prefix store greedy", lambda s: PS.check_greedy(s)[0]))
    out.append(("prefix store row of a batch", PS.check_row_of_batch))
    import test_train as TR
    out += [(f"train resume {p}", lambda s, p=p: TR.check_resume(p, s)) for p in ("tiny-dense", "tiny")]
    import test_parallel as PL
    out.append(("parallel 2 gloo ranks vs 1 process", lambda s: PL.check_parallel(100 + s)))
    return out


def kernel_worker(path: str):
    """Run in a subprocess with TRITON_INTERPRET=1: record every _check of the interpreter cases."""
    import torch
    import kernels_cases as kc
    torch.set_num_threads(1)
    records, plain = [], kc._check

    def recording(name, out, ref, yard=None, tol=1e-5):
        e = plain(name, out, ref, yard, tol)
        lim = tol if yard is None else 2 * kc.rel(yard, ref) + tol
        records.append((f"kernel {name}", e, lim))
        return e
    kc._check = recording
    res = kc.run_all("cpu", False, (torch.float32,))
    failed = [k for k, v in res.items() if not v["ok"]]
    with open(path, "w") as f:
        json.dump({"records": records, "failed": {k: res[k]["error"][-2000:] for k in failed}}, f)


def kernel_records():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.json")
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--kernel-worker", path], env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"kernel worker failed:\n{p.stderr[-3000:]}")
        with open(path) as f:
            data = json.load(f)
    for case, err in data["failed"].items():
        print(f"kernel case {case} FAILED:\n{err}", file=sys.stderr)
    return data["records"], bool(data["failed"])


def script_records():
    """The interpreter scripts with fixed inputs that print their comparisons: the HCA prefill stages
    (tests/test_hca_prefill_interpret.py, bar 2e-5 with its model there) and the model's Triton path vs its torch path
    (tests/kernel_wiring_check.py, bar 1e-4 with its model there)."""
    import re
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    recs = []
    p = subprocess.run([sys.executable, os.path.join(TESTS, "test_hca_prefill_interpret.py")], env=env,
                       capture_output=True, text=True)
    for m in re.finditer(r"^case (\d+) \S+ out (\S+) lse (\S+)", p.stdout, re.M):
        recs += [(f"HCA prefill interpreter case {m[1]} out", float(m[2]), 2e-5),
                 (f"HCA prefill interpreter case {m[1]} lse", float(m[3]), 2e-5)]
    if p.returncode != 0 or not recs:
        raise SystemExit(f"HCA prefill worker failed:\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    p = subprocess.run([sys.executable, os.path.join(TESTS, "kernel_wiring_check.py")], env=env, capture_output=True,
                       text=True)
    n = len(recs)
    for m in re.finditer(r"^(\{.*\}): max \|logits or loss diff\| (\S+), max \|grad diff\| (\S+),", p.stdout, re.M):
        recs += [(f"kernel wiring {m[1]} logits / loss", float(m[2]), 1e-4),
                 (f"kernel wiring {m[1]} grads", float(m[3]), 1e-4)]
    if p.returncode != 0 or len(recs) == n:
        raise SystemExit(f"kernel wiring check failed:\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds per seeded comparison (default 20)")
    ap.add_argument("--quick", action="store_true", help="2 seeds (CI)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the Triton interpreter cases")
    ap.add_argument("--only", default="", help="run only the checks whose label contains this text (or one of "
                    "several, comma-separated)")
    ap.add_argument("--kernel-worker", metavar="JSON", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, TESTS)
    sys.path.insert(0, ROOT)
    if a.kernel_worker:
        kernel_worker(a.kernel_worker)
        return 0
    seeds = 2 if a.quick else a.seeds
    if seeds < 1:
        print(f"tolerance_margins: --seeds = {seeds} is not allowed: an integer >= 1", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    worst: dict[str, list] = {}                 # name -> [ratio, err, tol, n]
    failed = False

    def add(name, err, tol):
        r = err / tol
        w = worst.setdefault(name, [r, err, tol, 0])
        if r >= w[0]:
            w[:3] = r, err, tol
        w[3] += 1

    t0 = time.time()
    only = [t for t in a.only.split(",") if t]
    for label, fn in seeded_checks():
        if only and not any(t in label for t in only):
            continue
        for s in range(seeds):
            for name, err, tol in fn(s):
                add(name, err, tol)
        print(f"  {label}: {seeds} seeds, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if not a.no_kernels and (not only or any(t in "kernel" for t in only)):
        recs, failed = kernel_records()
        for name, err, tol in recs:
            add(name, err, tol)
        print(f"  kernel cases: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        for name, err, tol in script_records():
            add(name, err, tol)
        print(f"  interpreter scripts: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"| comparison | runs | worst error | tolerance | worst error / tolerance |")
    print(f"|---|---:|---:|---:|---:|")
    for name, (r, e, t, n) in sorted(worst.items(), key=lambda kv: -kv[1][0]):
        flag = " **> 0.5**" if r > LIMIT else ""
        cell = name.replace("|", "\\|")                      # |x| in a name must not split the markdown cell
        print(f"| {cell} | {n} | {e:.3g} | {t:.3g} | {r:.3f}{flag} |")
    over = [n for n, w in worst.items() if w[0] > LIMIT]
    print(f"\n{len(worst)} comparisons, {seeds} seeds each (kernel cases: 1 fixed input); "
          f"{len(over)} above {LIMIT}; {time.time() - t0:.0f} s")
    return 1 if over or failed else 0


if __name__ == "__main__":
    sys.exit(main())
