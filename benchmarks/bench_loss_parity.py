"""Does the fast path train the same model? `small` for N steps on the reference path and on the fast paths, same
seeds, paired comparison of the final losses against the seed-to-seed spread.

Arms (every other setting equal; bf16 autocast on CUDA as training runs it):
    reference  kernels=torch compile=false    the naive PyTorch twins, eager (the math as written in docs/)
    triton     kernels=auto  compile=false    the Triton kernels, eager
    blocks     kernels=auto  compile=blocks   the Triton kernels + regional torch.compile (the throughput setting)
Each (arm, seed) is one `python -m dsv4_lab train` run in <root>/<arm>-s<seed>: a killed call resumes from the
checkpoints, a finished run is skipped, so the benchmark can be spread over several device calls. A finished
reference run whose folder is gone (a fresh machine) is taken from the committed loss_parity.json when that file's
setup (preset, steps, seq, batch, REFERENCE_NUMERICS) is this call's, and not run again; each run keeps the commit
it ran on. The fast arms, whose code is what the benchmark checks, run on the code at hand, unless
`--keep-recorded`: then every finished run of the committed file (any arm, same setup) is kept, the new `--seeds` are
added beside them, and the verdicts cover the union (each run names its commit: say in the report how the code
differs between them). `--fresh` reuses nothing; `--summary-only` recomputes the verdicts of the committed file.

Verdict: for each fast arm, the paired difference of the final validation loss (arm - reference, same seed = same
initial weights and batches) with its 95 % t interval (dsv4_lab/stats.py), beside the seed noise = the standard
deviation of the reference arm's final loss over seeds. "Within seed noise" when the interval's largest |value| is
below that standard deviation. With both fast arms, also `blocks` against `triton` (what compilation alone
changes). `seeds_needed`: the number of seeds at which an interval around the observed mean difference, of the
observed spread of the differences, would fit inside the seed noise (None when the mean alone does not; a fast path
whose runs decorrelate from the reference runs over the 200 steps, differences spread like two independent seeds,
sqrt(2) times the seed noise, needs 11 seeds at a zero mean). Writes
benchmarks/results/loss_parity.json (per run: the val-loss curve, the final val loss, the mean train loss of the last
20 steps, the commit).

    python benchmarks/bench_loss_parity.py [--steps 200] [--seq 4096] [--batch 2] [--seeds 0 1 2 3 4]
                                           [--arms reference triton blocks] [--jobs 3] [--cap 480] [--root DIR]
                                           [--fresh | --keep-recorded]
    python benchmarks/bench_loss_parity.py --preset tiny --seq 256 --steps 10 --arms reference triton   # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# The reference path's numerics under bf16 autocast, part of the setup a recorded reference run must match: raise it
# when they change (2: the mHC residual sites and final collapse in fp32 under autocast, docs §1.2; 3: the router
# logits in fp32 under autocast, docs §5.1.1)
REFERENCE_NUMERICS = 3
ARMS = {"reference": ["kernels=torch", "compile=false"],
        "triton": ["kernels=auto", "compile=false"],
        "blocks": ["kernels=auto", "compile=blocks"]}


def run_one(root, arm, seed, a, deadline):
    rd = os.path.join(root, f"{arm}-s{seed}")
    cmd = [sys.executable, "-m", "dsv4_lab", "train", f"preset={a.preset}", f"seq_len={a.seq}",
           f"batch_size={a.batch}", f"max_steps={a.steps}", f"seed={seed}", f"run_dir={rd}", "eval_interval=50",
           "eval_batches=4", "ckpt_interval=50", "log_interval=10", "progress=false", *ARMS[arm]]
    left = deadline - time.time()
    if left < 5:
        return arm, seed, "not started (cap)"
    t0 = time.time()
    os.makedirs(rd, exist_ok=True)
    err = os.path.join(rd, "stderr.log")                  # kept: a failed run's cause travels with its records
    try:
        with open(err, "w") as fh:
            p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=fh, text=True, timeout=left)
        status = "ok" if p.returncode == 0 else f"rc {p.returncode}: {_cause(err)}"
    except subprocess.TimeoutExpired:
        status = "cut at the cap (resumes from its checkpoint)"
    return arm, seed, f"{status} ({time.time() - t0:.0f} s)"


def _cause(err_path):
    """The error line of a failed run's stderr (the last line naming an Error), not CUDA's generic trailer."""
    lines = [ln.strip() for ln in open(err_path, errors="replace") if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errs or lines or ["(no stderr)"])[-1][:300]


def recorded_runs(path, setup, arms=("reference",)):
    """The finished runs of `arms` in an earlier loss_parity.json with the same setup ({} when there is none)."""
    try:
        prev = json.load(open(path))
    except (OSError, ValueError):
        return {}
    if prev.get("setup") != setup:
        return {}
    return {k: r for k, r in prev.get("runs", {}).items()
            if k.rsplit("-s", 1)[0] in arms and r.get("finished") and "final_val_loss" in r}


def _commit(rd):
    try:
        return json.load(open(os.path.join(rd, "env.json"))).get("git", {}).get("commit")
    except (OSError, ValueError):
        return None


def collect(root, arms, seeds, steps, recorded=None):
    """Per run: its records in <root>/<arm>-s<seed>, or else the finished run of `recorded` (recorded_runs)."""
    from dsv4_lab.runlog import read_metrics
    runs, final = {}, {arm: {} for arm in arms}
    for arm in arms:
        for s in seeds:
            name, rd = f"{arm}-s{s}", os.path.join(root, f"{arm}-s{s}")
            have = os.path.exists(os.path.join(rd, "metrics.jsonl"))
            if not have and name in (recorded or {}):
                runs[name] = {**recorded[name], "from": "loss_parity.json"}
                final[arm][s] = recorded[name]["final_val_loss"]
                continue
            recs = read_metrics(rd) if have else []
            val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
            losses = [x for r in recs for x in r.get("losses", [])]
            done = bool(val) and val[-1][0] == steps - 1                 # the last step (0-based) evaluated
            runs[name] = {"steps": recs[-1]["step"] + 1 if recs else 0, "finished": done, "val_curve": val,
                          "train_loss_last20": statistics.fmean(losses[-20:]) if losses else None,
                          "commit": _commit(rd)}
            if done:
                final[arm][s] = val[-1][1]
                runs[name]["final_val_loss"] = val[-1][1]
    return {"runs": runs, "final_val_loss": final, **judge(final)}


def judge(final):
    """Seed noise and verdicts from {arm: {seed: final val loss}}: every fast arm against the reference, and the
    compiled arm against the eager Triton one (what compilation alone changes) when both ran."""
    from dsv4_lab.stats import compare_arms
    ref = [final["reference"][s] for s in sorted(final.get("reference", {}))]
    noise = statistics.stdev(ref) if len(ref) >= 2 else None
    have = {arm: v for arm, v in final.items() if len(v) >= 2}
    comparisons = [(have, "reference")] if "reference" in have else []          # every fast arm vs the reference
    if "blocks" in have and "triton" in have:                                   # compilation alone
        comparisons.append(({"triton": have["triton"], "blocks": have["blocks"]}, "triton"))
    rows = []
    for arms, base in comparisons:
        for r in compare_arms(arms, base, lower_is_better=True):
            worst = max(abs(r["ci_low"]), abs(r["ci_high"]))
            r["seed_noise_std"] = noise
            r["within_seed_noise"] = bool(noise is not None and worst < noise)
            r["seeds_needed"] = seeds_needed(r["sd_diff"], noise, r["mean_diff"])
            rows.append(r)
    return {"seed_noise_std": noise, "verdicts": rows}


def seeds_needed(sd_diff, noise, mean_diff=0.0, alpha=0.05, n_max=200):
    """Smallest n whose paired-t interval |mean_diff| + t(1 - alpha/2, n-1) sd_diff / sqrt(n) lies inside the seed
    noise, the observed mean and spread taken as they are (None above n_max, without a spread, or when |mean_diff|
    alone reaches the noise)."""
    from dsv4_lab.stats import t_quantile
    if not noise or sd_diff is None or sd_diff != sd_diff or mean_diff != mean_diff:
        return None
    room = noise - abs(mean_diff)
    return next((n for n in range(2, n_max + 1) if t_quantile(1 - alpha / 2, n - 1) * sd_diff / n ** 0.5 < room),
                None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--jobs", type=int, default=3, help="runs at once (the reference path at 4096 x 2 takes tens of GB)")
    ap.add_argument("--cap", type=float, default=480.0, help="wall-clock cap (s); cut runs resume next call")
    ap.add_argument("--root", default=os.path.join("runs", "loss_parity"))
    ap.add_argument("--out", default=None, help="results dir (default benchmarks/results)")
    ap.add_argument("--fresh", action="store_true", help="run every (arm, seed) here, none from loss_parity.json")
    ap.add_argument("--keep-recorded", action="store_true",
                    help="keep every finished run of loss_parity.json (all arms) and add --seeds beside them")
    ap.add_argument("--summary-only", action="store_true",
                    help="recompute the verdicts of loss_parity.json; run nothing")
    a = ap.parse_args()
    if "reference" not in a.arms:
        ap.error("--arms must include 'reference' (the comparison's baseline)")
    out = os.path.join(a.out or os.path.join(HERE, "results"), "loss_parity.json")
    setup = {**{k: getattr(a, k) for k in ("preset", "steps", "seq", "batch")},
             "reference_numerics": REFERENCE_NUMERICS}
    if a.summary_only:                               # the verdicts again from the record (calls merged by hand)
        res = json.load(open(out))
        res.update(judge({arm: v for arm, v in res["final_val_loss"].items() if arm in res["arms"]}))
        return _report(res, out)
    if a.fresh and a.keep_recorded:
        ap.error("--fresh and --keep-recorded exclude each other")
    recorded = {} if a.fresh else recorded_runs(out, setup, tuple(ARMS) if a.keep_recorded else ("reference",))
    seeds = sorted(set(a.seeds) | ({int(k.rsplit("-s", 1)[1]) for k in recorded} if a.keep_recorded else set()))
    # the arms reported: those asked for, and with --keep-recorded every arm the committed file has finished runs of
    kept = {k.rsplit("-s", 1)[0] for k in recorded} if a.keep_recorded else set()
    arms = [arm for arm in ARMS if arm in a.arms or arm in kept]
    deadline = time.time() + a.cap
    jobs = []
    for s in a.seeds:
        for arm in a.arms:
            name = f"{arm}-s{s}"
            if name in recorded and not os.path.exists(os.path.join(a.root, name, "metrics.jsonl")):
                print(f"{name}: finished on {recorded[name].get('commit') or 'an unrecorded commit'} "
                      f"(loss_parity.json), not run again", flush=True)
            else:
                jobs.append((arm, s))
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        for arm, seed, status in ex.map(lambda j: run_one(a.root, *j, a, deadline), jobs):
            print(f"{arm}-s{seed}: {status}", flush=True)
    res = {"what": __doc__.split("\n\n")[0], "setup": setup,
           "arms": {arm: ARMS[arm] for arm in arms}, **collect(a.root, arms, seeds, a.steps, recorded)}
    return _report(res, out)


def _report(res, out):
    for r in res["verdicts"]:
        print(f"{r['arm']} - {r['baseline']}: {r['mean_diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
              f"(n {r['n_seeds']}, {r['verdict']}), seed noise std {r['seed_noise_std']:.4f}: "
              f"{'within' if r['within_seed_noise'] else 'NOT within'} seed noise "
              f"(seeds for an interval inside it at this mean and spread: {r['seeds_needed']})", flush=True)
    from dsv4_lab.runlog import atomic_write_bytes
    os.makedirs(os.path.dirname(out), exist_ok=True)
    atomic_write_bytes(out, json.dumps(res, indent=1).encode())
    print(out)


if __name__ == "__main__":
    main()
