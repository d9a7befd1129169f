"""benchmarks/bench_compile_parity.py's bookkeeping on the CPU: which routed experts had a routing pick flip between
the eager fp32, eager bf16 and compiled runs (their gradients sum other tokens and are counted apart), read from
the per-layer token counts the runs record."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_compile_parity as bcp  # noqa: E402


def test_expert_of_names_the_layer_and_expert_of_routed_expert_parameters_only():
    assert bcp.expert_of("blocks.2.ffn.experts.14.w1.weight") == ("blocks.2.ffn", 14)
    assert bcp.expert_of("mtp.layers.0.block.ffn.experts.7.w3.weight") == ("mtp.layers.0.block.ffn", 7)
    assert bcp.expert_of("blocks.2.ffn.shared_expert.w1.weight") is None
    assert bcp.expert_of("blocks.2.ffn.gate.weight") is None


def test_a_changed_token_count_marks_that_expert_in_that_layer_only():
    fp32 = {"blocks.1.ffn": {"load": [5.0, 3.0, 0.0]}, "blocks.2.ffn": {"load": [4.0, 4.0, 0.0]}}
    bf16 = {"blocks.1.ffn": {"load": [5.0, 3.0, 0.0]}, "blocks.2.ffn": {"load": [4.0, 4.0, 0.0]}}
    comp = {"blocks.1.ffn": {"load": [5.0, 3.0, 0.0]}, "blocks.2.ffn": {"load": [4.0, 3.0, 1.0]}}
    assert bcp.flipped_experts(fp32, bf16, bf16) == set()
    assert bcp.flipped_experts(fp32, bf16, comp) == {("blocks.2.ffn", 1), ("blocks.2.ffn", 2)}
    assert bcp.flipped_experts(comp, fp32) == {("blocks.2.ffn", 1), ("blocks.2.ffn", 2)}
    # a run without that layer's record (no MoE stats) decides nothing for it
    assert bcp.flipped_experts(fp32, {"blocks.1.ffn": {"load": [5.0, 3.0, 0.0]}}) == set()
