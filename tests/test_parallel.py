"""Two gloo processes on CPU vs one process at the same global batch (dsv4_lab/parallel.py, docs/methodology.md §2).

One spawn of 2 ranks runs, one after the other: ddp and fsdp2, each with AdamW and with Muon (tiny preset: mHC,
MoE with a hash layer, MTP, CSA with the indexer KL loss), and a 1-process checkpoint resumed on 2 ranks (fsdp2);
the parent then resumes a 2-rank fsdp2 checkpoint with 1 process. Every per-step train loss must equal the
uninterrupted 1-process run within LOSS_RTOL.

Error model for LOSS_RTOL. The batches are identical (each rank takes its rows of the same global batch), so the
runs differ only in fp32 summation order: the loss is the mean of two half-batch means instead of one mean, and
the gradient is a sum of two partial sums (all-reduce or fsdp2 reduce-scatter, then / 2, exact in binary) instead
of one sum over the batch; all-gathers (fsdp2, Muon's full matrix) move data without arithmetic. A reordered fp32
sum of n terms moves by at most ~log2(n) eps32 times the sum of |terms| (eps32 = 1.2e-7, n <= 4096 here:
~1.5e-6 relative for the positive sums of a cross-entropy). A gradient that differs by delta (relative) moves the
weights by ~lr * delta more per step (AdamW normalises by sqrt(v); Muon's Newton-Schulz is a fixed polynomial,
gain below ~10 on a perturbation of a matrix without tiny singular values), and the loss by |dL/dw| * dw: after
4 steps at lr 3e-3 that stays below the step's own reordering, so the loss difference is a few reorderings of
~1.5e-6, amplified by at most ~10: 1e-5 relative, 10x below LOSS_RTOL = 1e-4.
AdamW is only that tame with an eps well above the rounding noise of a gradient element: its update is
m / (sqrt(v) + eps), about g / (|g| + eps) in the first step, so an element whose exact gradient is ~0 and whose
computed one is rounding residue gets a step of up to lr with the residue's sign, a sign the summation order picks.
With the default eps = 1e-8 that moved one of four seeds tried (102, on an AMD EPYC) by 1.7e-6, 2.2e-5 and 1.5e-4 of the
loss at steps 1-3 in both ddp and fsdp2; with eps = 1e-6 by < 1e-7 at every step. The runs here use
adam_eps = 1e-6 (an update that moves by at most |dg| / eps for a gradient change dg); what they test is the
parallel code, not AdamW's handling of noise-level gradients. A wrong batch, a lost gradient
shard or a shard-wise Newton-Schulz moves a loss by 1e-2 or more. Discrete decisions (MoE top-k, indexer top-k)
could flip on a near tie and move a loss far beyond the bound: the test would then fail, never pass wrongly.
"""
from __future__ import annotations

import faulthandler
import json
import os
import shutil
import socket

import pytest
import torch

LOSS_RTOL = 1e-4
STEPS = 4
COMMON = ["preset=tiny", "seq_len=32", "batch_size=4", f"max_steps={STEPS}", "warmup_steps=1", "log_interval=1",
          "ckpt_interval=2", "eval_interval=1000", "eval_batches=1", "device=cpu", "progress=false",
          "adam_eps=1e-6"]                          # see the error model above
SEED = 3                                            # the test's input; scripts/tolerance_margins.py runs 20 others


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all n are chosen, so no port is handed out twice (two
    jobs of one spawn on one port: the second job's store could meet the first one's socket still closing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _keep_every_checkpoint():
    """Also copy each checkpoint to ckpt.pt.step<N>, so a mid-run checkpoint survives the run's later ones."""
    import dsv4_lab.train as tr
    save = tr.save_checkpoint

    def save_and_copy(obj, path):
        save(obj, path)
        shutil.copyfile(path, f"{path}.step{obj['step']}")
    tr.save_checkpoint = save_and_copy


def _train(overrides: list[str]) -> None:
    from dsv4_lab.config import parse_overrides
    from dsv4_lab.train import train
    mc, tc = parse_overrides(COMMON + overrides)                     # overrides carry seed=N
    train(mc, tc)


def _rank_main(rank: int, world: int, jobs: list[tuple[int, list[str]]]) -> None:
    faulthandler.enable(all_threads=True)           # a native crash prints every thread's Python stack (pytest shows it)
    _keep_every_checkpoint()
    for port, overrides in jobs:                    # one process group per job (train() creates and destroys it)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        _train(overrides)


def _losses(run_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["train_loss"] for r in recs}


def _resume_dir(src, dst, step: int) -> str:
    """A copy of run src whose ckpt.pt is its checkpoint of `step` (an interrupted run)."""
    os.makedirs(dst)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    shutil.copyfile(os.path.join(src, f"ckpt.pt.step{step}"), os.path.join(dst, "ckpt.pt"))
    return str(dst)


def _assert_close(got: dict, want: dict, what: str, steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= LOSS_RTOL * abs(want[s]), \
            f"{what}: step {s} loss {got[s]!r} vs one process {want[s]!r} (rtol {LOSS_RTOL})"


def run_all(root, seed: int) -> dict[str, str]:
    """Every run of this file under root: the 1-process references, the 2-rank runs (one spawn) and both resumes."""
    root = str(root)
    d = {k: str(os.path.join(root, k)) for k in ("ref_adamw", "ref_muon", "ddp_adamw", "fsdp2_adamw", "ddp_muon", "fsdp2_muon")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "OMP_NUM_THREADS")}
    os.environ.pop("WORLD_SIZE", None)
    import dsv4_lab.train as tr
    save = tr.save_checkpoint
    try:
        _keep_every_checkpoint()
        for opt in ("adamw", "muon"):
            _train([f"run_dir={d['ref_' + opt]}", f"optimizer={opt}", f"seed={seed}"])
        d["resume_1to2"] = _resume_dir(d["ref_muon"], os.path.join(root, "resume_1to2"), 1)
        ports = _free_ports(5)
        jobs = [(ports.pop(), [f"run_dir={d[f'{p}_{o}']}", f"parallel={p}", f"optimizer={o}", f"seed={seed}"])
                for p in ("ddp", "fsdp2") for o in ("adamw", "muon")]
        jobs.append((ports.pop(), [f"run_dir={d['resume_1to2']}", "parallel=fsdp2", "optimizer=muon",
                                   f"seed={seed}"]))
        os.environ["OMP_NUM_THREADS"] = "1"          # the children's math libraries start with one thread
        torch.multiprocessing.spawn(_rank_main, args=(2, jobs), nprocs=2, join=True)
        d["resume_2to1"] = _resume_dir(d["fsdp2_muon"], os.path.join(root, "resume_2to1"), 1)
        _train([f"run_dir={d['resume_2to1']}", "optimizer=muon", f"seed={seed}"])
    finally:
        tr.save_checkpoint = save
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return d


def check_parallel(seed: int) -> list[tuple[str, float, float]]:
    """(name, worst relative loss difference to the 1-process run, LOSS_RTOL) for every 2-rank run and resume."""
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        d = run_all(root, seed)
        out = []
        for name, ref, steps in [(f"{m} {o}", f"ref_{o}", range(STEPS)) for m in ("ddp", "fsdp2")
                                 for o in ("adamw", "muon")] + [(c, "ref_muon", range(2, STEPS))
                                                                 for c in ("resume_2to1", "resume_1to2")]:
            want, got = _losses(d[ref]), _losses(d[name.replace(" ", "_")])
            out.append((f"parallel {name}", max(abs(got[s] - want[s]) / abs(want[s]) for s in steps), LOSS_RTOL))
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("parallel"), SEED)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_two_ranks_match_one_process(runs, mode, opt):
    want, got = _losses(runs[f"ref_{opt}"]), _losses(runs[f"{mode}_{opt}"])
    assert sorted(got) == list(range(STEPS))
    env = json.load(open(os.path.join(runs[f"{mode}_{opt}"], "env.json")))
    assert (env["world_size"], env["parallel"]) == (2, mode)
    _assert_close(got, want, f"{mode} {opt} 2 ranks", range(STEPS))
    assert want[STEPS - 1] != want[0]                 # the runs really trained


@pytest.mark.parametrize("case", ["resume_2to1", "resume_1to2"])
def test_checkpoint_resumes_on_another_world_size(runs, case):
    want, got = _losses(runs["ref_muon"]), _losses(runs[case])
    assert sorted(got) == list(range(STEPS))
    env = json.load(open(os.path.join(runs[case], "env.resume2.json")))
    assert env["world_size"] == (1 if case == "resume_2to1" else 2)
    _assert_close(got, want, case, range(2, STEPS))   # steps 2.. were trained after the resume


def test_parallel_field_is_validated():
    from dsv4_lab.config import ConfigError, parse_overrides
    assert parse_overrides(["parallel=fsdp2"])[1].parallel == "fsdp2"
    with pytest.raises(ConfigError, match=r"'parallel' = 'zero3' is not allowed: one of \('ddp', 'fsdp2'\)"):
        parse_overrides(["parallel=zero3"])


def test_fsdp2_refuses_the_indexer_warmup_stage():
    from dsv4_lab.config import ConfigError, ModelConfig
    from dsv4_lab.parallel import check_supported
    warm = ModelConfig.from_preset("tiny", indexer_warmup_steps=2)
    check_supported(warm, "ddp")
    check_supported(ModelConfig.from_preset("tiny"), "fsdp2")
    with pytest.raises(ConfigError, match=r"'indexer_warmup_steps' = 2 is not allowed with parallel=fsdp2"):
        check_supported(warm, "fsdp2")


def test_fsdp2_refuses_the_loop_dispatch_where_unused_parameters_cannot_be_reduced(monkeypatch):
    """torch < 2.12 (FSDP2 without set_reduce_scatter_unused_params): the loop dispatch, which leaves an expert
    without tokens on one rank with no gradient, is refused under fsdp2; the grouped dispatch (a gradient for every
    expert) and ddp are not."""
    from dsv4_lab import parallel
    from dsv4_lab.config import ConfigError, ModelConfig
    loop = ModelConfig.from_preset("tiny", moe_dispatch="loop")
    monkeypatch.setattr(parallel, "fsdp2_reduces_unused", lambda: False)
    parallel.check_supported(ModelConfig.from_preset("tiny"), "fsdp2")
    parallel.check_supported(loop, "ddp")
    with pytest.raises(ConfigError, match=r"'moe_dispatch' = 'loop' is not allowed with parallel=fsdp2 on torch"):
        parallel.check_supported(loop, "fsdp2")
    monkeypatch.setattr(parallel, "fsdp2_reduces_unused", lambda: True)
    parallel.check_supported(loop, "fsdp2")
