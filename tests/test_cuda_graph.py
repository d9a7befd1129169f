"""cuda_graph=true (dsv4_lab/cuda_graph.py, docs/kernels.md §10): a graphed training run equals the eager run bit for
bit (GPU), across the graph's re-captures when host state changes; the config refuses what a graph cannot replay."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4_lab import parse_overrides
from dsv4_lab.config import ConfigError
from dsv4_lab.cuda_graph import GraphedStep
from dsv4_lab.model import DSV4LM
from dsv4_lab.runlog import load_checkpoint, read_metrics, same_config
from dsv4_lab.train import train

ROOT = Path(__file__).resolve().parents[1]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")


# --- refused configurations (CPU) --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, field", [
    (["compile=blocks"], "compile"),
    (["compile=auto"], "compile"),
    (["compile=false", "anticipatory=always"], "anticipatory"),
])
def test_config_refuses_what_a_graph_cannot_replay(tmp_path, extra, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        train(*parse_overrides(["preset=tiny", "cuda_graph=true", f"run_dir={tmp_path}", *extra]))
    assert not any(tmp_path.iterdir())                      # refused before anything is written


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
