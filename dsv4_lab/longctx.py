"""Long-context quality vs context length (the paper's MRCR-vs-length figure at lab scale, docs/methodology.md §3.5).

Three arms that differ only in their attention layers (everything else is the `tiny` preset: mHC, MoE, MTP):
    v4     swa, csa, hca, csa   (the V4 mix: window + compressed sparse / heavily compressed attention)
    dense  dense*4              (full causal attention)
    swa    swa*4                (window only: cannot see a needle farther back than the window)
are trained on the synthetic MRCR-like task (dsv4_lab/data/synthetic.py `mrcr_batch`: needles of 3 types, a query
asks for the ORDINAL-th needle of a TYPE, answer = its 4 content tokens; `task_mrcr_queries` queries per sequence,
each about another needle) at one fixed training length, then each trained model answers fresh MRCR sequences at
every evaluation length, from well inside the window to several times the training length. Answer accuracy = token
accuracy over the answer tokens (chance 1/64: contents are uniform over 64 byte values); exact match = every answer
token of a sequence right. Also split by dependency distance (<= window / > window).

Positions beyond the training length: the RoPE tables are built for `max_seq_len` positions, which the settings
set to the longest evaluation length. The tables are fixed functions of the position (no learned position
parameter), so a model built with a larger max_seq_len trains exactly as one built with max_seq_len = seq_len
(tests/test_longctx.py checks the logits are equal); beyond the training length the model meets relative distances
(dense, and the compressed entries' positions in CSA / HCA) it never trained on: that is what the curve measures.

    python -m dsv4_lab longctx run [--setting gpu] [--jobs N] [--root runs/longctx] [--stop-after S]
                                   [--arms v4,dense,swa] [--seeds 0,1,2] [--out ablations/results/long_context.json]
    python -m dsv4_lab longctx collect [--root runs/longctx] [--out ablations/results/long_context.json]
    python -m dsv4_lab longctx figure [--results ablations/results/long_context.json] [--out figures/long_context_quality.png]

Resumable, one record per arm x seed: <root>/<setting>/<arm>-s<seed>/ holds the training run (train.py: config,
metrics, checkpoint; a killed run resumes from its checkpoint) and eval.json, rewritten atomically after each
evaluation length (a killed evaluation continues with the lengths left). `run` executes the unfinished arm x seed
pairs `--jobs` at a time as separate processes (several per GPU: the tiny models are launch-bound), then `collect`
writes the results JSON (finished records only) from which `figure` draws figures/long_context_quality.png.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import ConfigError, parse_overrides
from .runlog import RunError, environment, load_checkpoint, load_json, save_json
from .sweep import child_env, device_count

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "ablations" / "results" / "long_context.json"
FIGURE = ROOT / "figures" / "long_context_quality.png"
ARMS = {"v4": {"layer_types": "swa,csa,hca,csa"}, "dense": {"layer_types": "dense*4"},
        "swa": {"layer_types": "swa*4"}}
CHANCE = 1 / 64                                  # answer token accuracy of a uniform guess over the 64 contents

# A setting: the training overrides shared by the arms, the evaluation lengths, seeds and evaluation size.
SETTINGS = {
    # tests / CI: seconds on one CPU core, checks the machinery only (nothing is learned in 4 steps)
    "cpu-tiny": {
        "train": {"preset": "tiny", "data": "mrcr", "seq_len": 64, "batch_size": 2, "max_steps": 4, "lr": 3e-3,
                  "warmup_steps": 1, "window": 16, "task_n_needles": 1, "eval_interval": 4, "eval_batches": 1,
                  "log_interval": 2, "ckpt_interval": 2},
        "lengths": [32, 64, 128], "seeds": [0], "eval_seqs": 4, "eval_tokens": 512,
    },
    # the H200 setting (ablations/README.md "Long-context quality"): train at 512 tokens with a 128-token window
    # (64 sequences per step, each asking about all 6 of its needles: the queries are the supervision), evaluate
    # from 96 (every needle inside the window) to 4096 (8x the training length); several runs packed on one GPU;
    # forward + backward replayed from a CUDA graph (cuda_graph=true: these launch-bound steps ran 2.4-3.1x faster
    # at the 4-layer ablation settings, benchmarks/results/cuda_graph.json), hence compile=false. head_dim 64: the
    # tiny preset's shared K = V head of 32 dims has 16 RoPE'd dims, leaving 16 for the content a retrieval must
    # both match and return (V4: 64 of 512 RoPE'd); LR 3e-4, not the default 3e-3: in the CPU probes MRCR was
    # learned at 3e-4 and barely at 1e-4, 1e-3 or 3e-3. With one query per sequence, head_dim 32 and LR 3e-3 no arm
    # had left chance after 1500-1750 of 2000 steps (run 24). The probes: ablations/README.md "Long-context quality".
    "gpu": {
        "train": {"preset": "tiny", "data": "mrcr", "seq_len": 512, "batch_size": 64, "max_steps": 2000,
                  "lr": 3e-4, "warmup_steps": 100, "window": 128, "task_n_needles": 2, "task_mrcr_queries": 6,
                  "head_dim": 64, "eval_interval": 250, "eval_batches": 4, "log_interval": 50,
                  "ckpt_interval": 250, "compile": "false", "cuda_graph": "true"},
        "lengths": [96, 128, 256, 512, 1024, 2048, 4096], "seeds": [0, 1, 2], "eval_seqs": 256,
        "eval_tokens": 32768,
    },
}
EVAL_SEED = 987_654                              # the evaluation sequences: the same for every arm and seed


def _setting(name: str) -> dict:
    if name not in SETTINGS:
        raise ConfigError(f"longctx setting {name!r} is not allowed: one of {sorted(SETTINGS)}")
    return SETTINGS[name]


def overrides(setting: str, arm: str, seed: int, root: str) -> dict:
    """The train overrides of one arm x seed (max_seq_len = the longest evaluation length, see the docstring)."""
    s = _setting(setting)
    if arm not in ARMS:
        raise ConfigError(f"longctx arm {arm!r} is not allowed: one of {sorted(ARMS)}")
    rd = Path(root) / setting / f"{arm}-s{seed}"
    return {**s["train"], **ARMS[arm], "max_seq_len": max(s["lengths"] + [s["train"]["seq_len"]]),
            "seed": seed, "run_dir": str(rd), "progress": False}


def run_dir(setting: str, arm: str, seed: int, root: str) -> Path:
    return Path(overrides(setting, arm, seed, root)["run_dir"])


def read_eval(path) -> dict:
    """eval.json of one arm x seed; RunError naming the file when it is not one (delete it to re-evaluate)."""
    try:
        rec = load_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunError(f"{path} cannot be read as JSON ({' '.join(str(e).split())[:120]}); delete it to evaluate "
                       "again") from None
    if not (isinstance(rec, dict) and isinstance(rec.get("lengths"), dict)):
        raise RunError(f"{path} is not a longctx evaluation record (an object with 'lengths'); delete it to "
                       "evaluate again")
    return rec


def is_done(setting: str, arm: str, seed: int, root: str) -> bool:
    p = run_dir(setting, arm, seed, root) / "eval.json"
    return p.exists() and set(read_eval(p)["lengths"]) >= {str(n) for n in _setting(setting)["lengths"]}


# --------------------------------------------------------------------------------------------------------------
# one arm x seed: train (or resume / skip), then evaluate every length not yet in eval.json
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_length(model, length: int, n_seqs: int, n_needles: int, window: int, device, amp,
                    max_tokens: int, n_queries: int = 1) -> dict:
    """Answer accuracy of `model` on n_seqs MRCR sequences of `length` tokens with n_queries queries each (fixed by
    EVAL_SEED and the length, in batches of at most max_tokens tokens); near / far = answers whose needle is <= / >
    window tokens before its query; exact match = every answer token of a sequence right."""
    from .data.synthetic import answer_distances, mrcr_batch
    per = max(1, min(n_seqs, max_tokens // length))
    c = dict.fromkeys(("correct", "answers", "exact", "correct_near", "n_near", "correct_far", "n_far"), 0)
    for i, start in enumerate(range(0, n_seqs, per)):
        b = min(per, n_seqs - start)
        x, y = mrcr_batch(b, length, n_needles, seed=EVAL_SEED + length, index=i, n_queries=n_queries)
        with amp():
            logits = model(x.to(device)).logits
        mask = y != -100
        ok = (logits.argmax(-1).cpu() == y) & mask
        far = answer_distances(x, y) > window
        c["correct"] += int(ok.sum())
        c["answers"] += int(mask.sum())
        c["exact"] += int((ok | ~mask).all(-1).sum())
        for k, sel in (("near", mask & ~far), ("far", mask & far)):
            c[f"correct_{k}"] += int((ok & sel).sum())
            c[f"n_{k}"] += int(sel.sum())
    out = {"answer_acc": c["correct"] / c["answers"], "exact_match": c["exact"] / n_seqs, "n_seqs": n_seqs,
           "n_answers": c["answers"]}
    for k in ("near", "far"):
        out[f"answer_acc_{k}"] = c[f"correct_{k}"] / c[f"n_{k}"] if c[f"n_{k}"] else None
        out[f"n_answers_{k}"] = c[f"n_{k}"]
    return out


def run_one(setting: str, arm: str, seed: int, root: str, log=print) -> dict:
    """Train (resume, or skip when finished) one arm x seed, then evaluate the lengths eval.json lacks."""
    from contextlib import nullcontext

    from .model import DSV4LM
    from .train import resolve_device, train
    s = _setting(setting)
    mc, tc = parse_overrides(overrides(setting, arm, seed, root))
    t0 = time.time()
    last = train(mc, tc)
    train_s = time.time() - t0
    device = resolve_device(tc)
    model = DSV4LM(mc).to(device)
    model.load_state_dict(load_checkpoint(Path(tc.run_dir) / "ckpt.pt", map_location=device)["model"])
    model.eval()
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    path = Path(tc.run_dir) / "eval.json"
    rec = read_eval(path) if path.exists() else {"setting": setting, "arm": arm, "seed": seed, "lengths": {}}
    rec.setdefault("train_s", round(train_s, 2))
    rec["final_val_loss"] = last.get("val_loss")
    rec["env"] = environment(device)
    for n in s["lengths"]:
        if str(n) in rec["lengths"]:
            continue
        t1 = time.time()
        r = evaluate_length(model, n, s["eval_seqs"], tc.task_n_needles, mc.window, device, amp, s["eval_tokens"],
                            tc.task_mrcr_queries)
        r["eval_s"] = round(time.time() - t1, 3)
        rec["lengths"][str(n)] = r
        save_json(rec, path)                       # after each length: a killed evaluation loses at most one
        log(f"[longctx {arm} s{seed}] length {n}: answer_acc {r['answer_acc']:.3f}, exact {r['exact_match']:.3f}")
    save_json(rec, path)
    return rec


# --------------------------------------------------------------------------------------------------------------
# many arm x seed pairs, packed as processes
# --------------------------------------------------------------------------------------------------------------

def run_all(setting: str, root: str, arms: list[str], seeds: list[int], jobs: int = 1,
            stop_after: float | None = None) -> list[tuple[str, int]]:
    """Run the unfinished pairs `jobs` at a time (child processes); returns the pairs that failed or are left."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    for a in arms:                                  # every pair's config resolves before anything starts
        for sd in seeds:
            parse_overrides(overrides(setting, a, sd, root))
    todo = [(a, sd) for sd in seeds for a in arms if not is_done(setting, a, sd, root)]
    root = str(Path(root).resolve())               # the children run from the repository root
    n_gpus, stop_at = device_count(), (time.time() + stop_after if stop_after is not None else None)
    print(f"[longctx] setting {setting}: {len(arms) * len(seeds)} runs, {len(todo)} to do, jobs {jobs}", flush=True)

    def child(pair, slot):
        arm, seed = pair
        rd = run_dir(setting, arm, seed, root)
        rd.mkdir(parents=True, exist_ok=True)
        env = child_env(slot, jobs, n_gpus)
        cmd = [sys.executable, "-m", "dsv4_lab", "longctx", "one", "--setting", setting, "--arm", arm,
               "--seed", str(seed), "--root", root]
        with open(rd / "longctx.log", "ab") as fh:
            return subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode

    left, free, pending = list(todo), list(range(jobs)), {}
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        while left or pending:
            while left and free and (stop_at is None or time.time() < stop_at):
                pair, slot = left.pop(0), free.pop(0)
                pending[ex.submit(child, pair, slot)] = (pair, slot)
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                pair, slot = pending.pop(f)
                free.append(slot)
                ok = f.result() == 0 and is_done(setting, *pair, root)
                print(f"[longctx] {pair[0]} seed {pair[1]}: {'done' if ok else 'FAILED (see longctx.log)'}", flush=True)
    return [(a, sd) for a, sd in todo if not is_done(setting, a, sd, root)]


def collect(root: str, setting: str | None = None) -> dict:
    """The results JSON: every finished arm x seed record under root (all lengths evaluated)."""
    records, meta = [], {}
    for p in sorted(Path(root).glob("*/*-s*/eval.json")):
        rec = read_eval(p)
        if setting is not None and rec.get("setting") != setting:
            continue
        s = SETTINGS.get(rec.get("setting"), {})
        if not s or not is_done(rec["setting"], rec["arm"], rec["seed"], root):
            continue
        cfg = load_json(p.parent / "config.json")
        meta.setdefault(rec["setting"], {"lengths": s["lengths"], "eval_seqs": s["eval_seqs"],
                                          "train_seq_len": cfg["train"]["seq_len"],
                                          "max_steps": cfg["train"]["max_steps"],
                                          "batch_size": cfg["train"]["batch_size"],
                                          "window": cfg["model"]["window"],
                                          "task_n_needles": cfg["train"]["task_n_needles"],
                                          "task_mrcr_queries": cfg["train"].get("task_mrcr_queries", 1),
                                          "lr": cfg["train"]["lr"], "head_dim": cfg["model"]["head_dim"],
                                          "arms": {}})
        meta[rec["setting"]]["arms"].setdefault(rec["arm"], cfg["model"]["layer_types"])
        records.append({k: rec[k] for k in ("setting", "arm", "seed", "lengths", "train_s", "final_val_loss")}
                       | {"device": rec["env"].get("gpu") or f"cpu x{rec['env'].get('torch_threads', '?')}"})
    return {"what": "MRCR-like answer accuracy vs context length per arm x seed (dsv4_lab/longctx.py); train_s = "
                    "wall seconds of the last training segment (since the resume, for a resumed run)",
            "chance_answer_acc": CHANCE, "settings": meta, "records": records,
            "comparisons": comparisons(records)}


def comparisons(records: list[dict], baseline: str = "dense", metric: str = "answer_acc") -> list[dict]:
    """Every other arm against `baseline` at every evaluation length, per setting: the mean over seeds of the paired
    difference (arm - baseline, same seed), its 95 % t-interval and p (dsv4_lab/stats.py), Holm-adjusted over all
    (arm, length) pairs of the setting, and the verdict (higher accuracy is better)."""
    from .stats import compare_arms, holm, verdict
    rows = []
    for setting in sorted({r["setting"] for r in records}):
        recs = [r for r in records if r["setting"] == setting]
        lengths = sorted({int(n) for r in recs for n in r["lengths"]})
        block = []
        for n in lengths:
            vals: dict = {}
            for r in recs:
                v = r["lengths"].get(str(n), {}).get(metric)
                if v is not None:
                    vals.setdefault(r["arm"], {})[r["seed"]] = v
            if baseline not in vals:
                continue
            block += [{"setting": setting, "length": n, "metric": metric, **c}
                      for c in compare_arms(vals, baseline, lower_is_better=False)]
        for c, ph in zip(block, holm([c["p"] for c in block])):
            c["p_holm"] = ph                    # over every (arm, length) of the setting, not per length
            c["verdict"] = verdict(c["mean_diff"], ph, lower_is_better=False) if c["n_seeds"] >= 2 else c["verdict"]
        rows += block
    return rows


def _cli_common(ap):
    ap.add_argument("--setting", default="gpu")
    ap.add_argument("--root", default="runs/longctx")


def longctx_cli(args: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dsv4_lab longctx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    _cli_common(r)
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--stop-after", type=float, default=None, help="start no new run after this many seconds")
    r.add_argument("--arms", default=",".join(ARMS))
    r.add_argument("--seeds", default=None, help="comma list (default: the setting's seeds)")
    r.add_argument("--out", default=str(RESULTS))
    o = sub.add_parser("one")
    _cli_common(o)
    o.add_argument("--arm", required=True)
    o.add_argument("--seed", type=int, required=True)
    c = sub.add_parser("collect")
    c.add_argument("--root", default="runs/longctx")
    c.add_argument("--setting", default=None)
    c.add_argument("--out", default=str(RESULTS))
    f = sub.add_parser("figure")
    f.add_argument("--results", default=str(RESULTS))
    f.add_argument("--out", default=str(FIGURE))
    a = ap.parse_args(args)
    if a.cmd == "one":
        run_one(a.setting, a.arm, a.seed, a.root)
        return 0
    if a.cmd == "figure":
        from .figures.long_context import plot_long_context
        print(f"[longctx] figure {plot_long_context(a.results, a.out)}")
        return 0
    if a.cmd == "run":
        s = _setting(a.setting)
        arms = [x for x in a.arms.split(",") if x]
        bad = [x for x in arms if x not in ARMS]
        if bad or not arms:
            raise ConfigError(f"longctx --arms {a.arms!r} is not allowed: a comma list from {sorted(ARMS)}")
        try:
            seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else list(s["seeds"])
        except ValueError:
            raise ConfigError(f"longctx --seeds {a.seeds!r} is not allowed: a comma list of integers") from None
        if a.jobs < 1:
            raise ConfigError(f"longctx --jobs {a.jobs} is not allowed: a positive integer")
        left = run_all(a.setting, a.root, arms, seeds, a.jobs, a.stop_after)
    res = collect(a.root, a.setting)
    save_json(res, a.out)
    print(f"[longctx] {len(res['records'])} finished records -> {a.out}")
    if a.cmd == "run" and left:
        print(f"[longctx] {len(left)} runs left: run the same command again to continue", flush=True)
        return 3
    return 0


if __name__ == "__main__":                      # pragma: no cover
    sys.exit(longctx_cli(sys.argv[1:]))
