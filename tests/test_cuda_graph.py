"""cuda_graph=true (dsv4_lab/cuda_graph.py, docs/kernels.md §10): a graphed training run equals the eager run bit for
bit (GPU), across the graph's re-captures when host state changes; the config refuses what a graph cannot replay."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4_lab import parse_overrides
from dsv4_lab.config import ConfigError, check_train_pair
from dsv4_lab.cuda_graph import GraphedStep
from dsv4_lab.model import DSV4LM
from dsv4_lab.moe import SpikeDetector
from dsv4_lab.runlog import load_checkpoint, read_metrics, same_config
from dsv4_lab.train import train

ROOT = Path(__file__).resolve().parents[1]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")


# --- refused configurations (CPU) --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, field", [
    (["compile=blocks"], "compile"),
    (["compile=auto"], "compile"),
])
def test_config_refuses_what_a_graph_cannot_replay(tmp_path, extra, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        train(*parse_overrides(["preset=tiny", "cuda_graph=true", f"run_dir={tmp_path}", *extra]))
    assert not any(tmp_path.iterdir())                      # refused before anything is written


def test_config_accepts_anticipatory_routing_with_a_graph():
    """The router's snapshots are fixed-address buffers and its on/off state is in the graph's key (moe.py)."""
    for mode in ("always", "auto"):
        check_train_pair(*parse_overrides(["preset=tiny", "cuda_graph=true", "compile=false", f"anticipatory={mode}"]))


def test_cli_refuses_cuda_graph_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsv4_lab", "train", "preset=tiny-dense", "cuda_graph=true",
                        "compile=false", "device=cpu", "max_steps=2", f"run_dir={tmp_path / 'r'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-500:]
    assert "cuda_graph" in r.stderr and "device=cuda" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_cuda_graph_does_not_change_the_run_identity():
    a = {"model": {}, "train": {"max_steps": 5, "cuda_graph": False}}
    assert same_config(a, {"model": {}, "train": {"max_steps": 5, "cuda_graph": True}})   # eager resumes graphed
    assert same_config({"model": {}, "train": {"max_steps": 5}}, a)                        # records before the field


def test_warmup_steps_are_plain_eager_steps():
    """GraphedStep's eager steps (before any capture) give the gradients of a plain forward + backward, also
    when .grad was left set by a previous step (it is unset first, never accumulated)."""
    mc, _ = parse_overrides(["preset=tiny", "ffn=dense", "n_hash_layers=0", "mtp_depth=0"])
    torch.manual_seed(0)
    model = DSV4LM(mc)
    x = torch.randint(0, mc.vocab_size, (2, 32))
    y = torch.randint(0, mc.vocab_size, (2, 32))
    model(x, y).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    step = GraphedStep(model, warmup=2)
    for _ in range(2):                                     # .grad is set from the step before: must be replaced
        out = step(x, y)
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    assert torch.isfinite(out.loss) and step.captures == 0
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(model, warmup=0)


# --- GPU: graphed == eager, bit for bit --------------------------------------------------------------------------
# Both runs deterministic (kernels=torch: the Triton backward kernels add gradients with fp32 atomics, so two eager
# runs on them already differ in the last bits; docs §6.5). What a graph gains and how far its Triton-kernel runs
# land from eager ones, against the eager-vs-eager spread, is measured by benchmarks/bench_cuda_graph.py.

V4 = ["preset=tiny", "progress=false", "seq_len=128", "batch_size=4", "log_interval=1", "compile=false",
      "device=cuda", "eval_interval=12", "eval_batches=1", "deterministic=true", "kernels=torch"]


def _run(run_dir, graph, *extra):
    mc, tc = parse_overrides(V4 + [f"run_dir={run_dir}", f"cuda_graph={graph}", *extra])
    train(mc, tc)
    return read_metrics(run_dir), load_checkpoint(run_dir / "ckpt.pt")["model"]


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("extra", [
    ["max_steps=12", "layer_types=csa,hca", "mtp_depth=1", "optimizer=adamw"],
    # MTP weight changes when the LR starts to decay (step 6) and the indexer leaves its warm-up (step 4): two
    # more captures; Muon's step stays eager
    ["max_steps=16", "layer_types=csa,hca", "mtp_depth=1", "warmup_steps=6", "indexer_warmup_steps=4",
     "optimizer=muon"],
    ["max_steps=12", "layer_types=dense*2", "residual=hc", "ffn=dense", "n_hash_layers=0", "quant=fp4"],
])
def test_graphed_run_equals_eager_run_bitwise(tmp_path, extra):
    eager, w_eager = _run(tmp_path / "eager", "false", *extra)
    graph, w_graph = _run(tmp_path / "graph", "true", *extra)
    assert [r["train_loss"] for r in graph] == [r["train_loss"] for r in eager]
    assert [r.get("val_loss") for r in graph] == [r.get("val_loss") for r in eager]
    assert w_graph.keys() == w_eager.keys() and all(torch.equal(w_graph[k], w_eager[k]) for k in w_eager)
    assert graph[-1]["cuda_graph_replays"] > 0                  # the graph ran, not only the eager warm-up


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_graphed_anticipatory_routing_equals_eager_bitwise(tmp_path, monkeypatch, mode):
    """Anticipatory routing under a graph: the replayed forward reads the router snapshots that the eager
    on_train_step shifts in place, and `auto` switching routing on and off changes the graph's key (moe.routing_key):
    two more captures. The spike is scripted (the detector keeps its history but reports a spike at the loss of step
    5) so that the on/off steps do not depend on the GPU's loss curve: lagged routing on steps 6-10, then off; with 3
    eager warm-up steps per key (the MTP weight changes the key at step 1 too) every phase has replayed steps."""
    extra = ["max_steps=16", "layer_types=csa,hca", "mtp_depth=1", "optimizer=adamw", f"anticipatory={mode}"]
    if mode == "always":
        extra.append("anticipatory_delta=2")
        want = [1.0] * 16
    else:
        extra += ["anticipatory_delta=1", "anticipatory_period=5"]
        want = [0.0] * 6 + [1.0] * 5 + [0.0] * 5
        real = SpikeDetector.__call__

        def spike_at_step_5(self, loss):
            real(self, loss)
            return len(self.losses) == 6
        monkeypatch.setattr(SpikeDetector, "__call__", spike_at_step_5)
    eager, w_eager = _run(tmp_path / "eager", "false", *extra)
    graph, w_graph = _run(tmp_path / "graph", "true", *extra)
    key = "blocks.1.ffn.anticipatory_active"
    assert [r[key] for r in eager] == want and [r[key] for r in graph] == want
    assert [r["train_loss"] for r in graph] == [r["train_loss"] for r in eager]
    assert [r.get("val_loss") for r in graph] == [r.get("val_loss") for r in eager]
    assert w_graph.keys() == w_eager.keys() and all(torch.equal(w_graph[k], w_eager[k]) for k in w_eager)
    n = [r["cuda_graph_replays"] for r in graph]                  # cumulative: step t replayed if n[t] > n[t - 1]
    replayed = [b > a for a, b in zip([0] + n, n)]
    phases = [range(16)] if mode == "always" else [range(6), range(6, 11), range(11, 16)]
    assert all(any(replayed[t] for t in ph) for ph in phases), replayed
    over = "blocks.1.ffn.anticipatory_overhead_s"
    if mode == "always":                          # measured in eager forwards only (a replay runs no Python)
        assert all(over in r for r in eager) and over not in graph[-1] and over in graph[0]


@pytest.mark.gpu
@NEEDS_CUDA
def test_graphed_run_resumes_from_an_eager_checkpoint(tmp_path):
    """Kill-and-resume across modes: 12 steps graphed == 6 eager, then resumed graphed to 12, bit for bit (the
    checkpoint is loaded onto the GPU: its CPU RNG state must go back to the CPU)."""
    extra = ["max_steps=12", "ckpt_interval=6", "layer_types=csa,hca"]
    full, w_full = _run(tmp_path / "full", "true", *extra)
    half = tmp_path / "half"
    mc, tc = parse_overrides(V4 + [f"run_dir={half}", "cuda_graph=false", *extra])
    tc.max_steps = 12
    train_mod = sys.modules["dsv4_lab.train"]
    calls = {"n": 0}
    orig = train_mod.save_checkpoint

    def stop_after_first(obj, path):                       # the eager run "dies" right after its step-5 checkpoint
        orig(obj, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
    train_mod.save_checkpoint = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            train(mc, tc)
    finally:
        train_mod.save_checkpoint = orig
    resumed, w_res = _run(half, "true", *extra)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]
    assert all(torch.equal(w_res[k], w_full[k]) for k in w_full)
