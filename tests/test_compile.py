"""torch.compile of the model (dsv4_lab/compilation.py, TrainConfig.compile): a compiled training step gives the
eager loss and gradients, for the tiny presets and a few toggle combinations; the settings made before compiling.

Backends: "inductor" (what compile=true uses; C++ kernels on the CPU) for tiny-dense; "aot_eager" (Dynamo +
AOTAutograd tracing with eager kernels: it fails on what breaks graph capture, without Inductor's C++ builds, which
take minutes for the V4 graph on 2 cores) for the tiny V4 preset at 3 layers and a toggle combination. Inductor on
the V4 graph (Triton) is the GPU run's job. All go through `compile_model`, as training does.

Error model: the compiled graph computes the same fp32 ops; Inductor fuses elementwise chains and may reorder
reductions (relative differences O(n u), u = 2^-24, n <= 512 terms), which moves the loss by < 1e-6 relative and
each parameter's gradient by < 1e-5 relative (a floor of 1e-3 of the whole gradient's norm per parameter covers
gradients that are small by cancellation); the tolerances (1e-5 loss, 1e-4 per parameter gradient) leave room.
Every parameter is compared, not the total norm: a compiled step that loses one module's gradients (zero or None)
must fail. Discrete picks:
the Inductor case (tiny-dense) has none (dense attention, dense FFN); the V4 cases run aot_eager, i.e. the eager
kernels on the same shapes: their compiled loss equals the eager one bitwise (measured: a difference of 0.0 in
every case, on Intel and AMD x86), so the forward's MoE and CSA top-k see identical scores and cannot flip; the
gradients may differ by ~1e-9 relative (a traced backward can run a GEMM on other layouts, another summation
order on some CPUs).
"""
import contextlib

import pytest
import torch

from dsv4_lab import DSV4LM, ModelConfig
from dsv4_lab.compilation import compile_model, configure, regional, wants_compile
from dsv4_lab.config import ConfigError, TrainConfig, parse_overrides
from numerics import grad_mismatches


def _step(model, x, y):
    """One forward + backward -> (loss, {parameter name: gradient, fp64 copy})."""
    model.zero_grad(set_to_none=True)
    out = model(x, y)
    out.loss.backward()
    return out.loss.item(), {n.removeprefix("_orig_mod."): p.grad.double().clone()        # torch.compile's wrapper
                             for n, p in model.named_parameters() if p.grad is not None}


def _check_grads(got: dict, ref: dict, rtol: float = 1e-4):
    """Every parameter's gradient within rtol of eager's (per parameter, with a floor: tests/numerics.py)."""
    bad = grad_mismatches(got, ref, rtol)
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1][0])[:6]


def _compare(preset, backend, T=32, regional=False, **over):
    torch.manual_seed(0)
    model = DSV4LM(ModelConfig.from_preset(preset, **over)).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (2, T), generator=g)
    y = torch.randint(0, model.cfg.vocab_size, (2, T), generator=g)
    loss_e, g_e = _step(model, x, y)
    torch._dynamo.reset()
    loss_c, g_c = _step(compile_model(model, regional=regional, backend=backend), x, y)
    assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e), (loss_c, loss_e)
    _check_grads(g_c, g_e)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_matches_eager_inductor():
    """tiny-dense through Inductor (what compile=true runs): dense layers with the sink (SDPA), SwiGLU, plain residual."""
    _compare("tiny-dense", "inductor")


@pytest.mark.slow
def test_regional_compile_matches_eager():
    """compile=blocks: each Block compiled on its own (the MTP block included); blocks of one layer type share
    the compiled code. Same step as eager (same error model as above)."""
    from dsv4_lab.model import Block
    _compare("tiny", "aot_eager", regional=True, layer_types="csa,hca,csa", hc_sinkhorn_iters=3)
    torch.manual_seed(0)
    model = DSV4LM(ModelConfig.from_preset("tiny", layer_types="csa,hca", mtp_depth=1))
    assert compile_model(model, regional=True, backend="aot_eager") is model
    compiled = lambda f: hasattr(f, "_torchdynamo_orig_callable")          # noqa: E731  (torch.compile's wrapper)
    assert compiled(model.hidden_to_logits) and compiled(model.mtp.layers[0].mix)
    assert not compiled(DSV4LM.hidden_to_logits)                           # the instance, not the class
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == 3 and all(hasattr(m, "_compiled_call_impl") and m._compiled_call_impl is not None
                                    for m in blocks)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("over", [
    dict(layer_types="swa,csa,hca", hc_sinkhorn_iters=3),
    dict(layer_types="dense,csa", residual="hc", n_hash_layers=0, mtp_depth=2, attn_sink=False),
    dict(layer_types="csa,hca", quant="fp4", score_func="sigmoid", swiglu_limit=0.0, hc_sinkhorn_iters=3),
    dict(layer_types="csa,swa", index_mode="oracle", index_hadamard=False, residual="plain", qk_norm=False,
         q_lora_rank=0, o_groups=0),
    dict(layer_types="csa,hca", anticipatory="always", index_mode="random", compressor_overlap=False,
         hc_sinkhorn_iters=3),
    dict(layer_types="csa,hca", window_branch=False, index_mode="all", indexer_loss_weight=0.0, output_rope=False,
         ffn="dense", n_hash_layers=0, hc_sinkhorn_iters=3),
    dict(layer_types="csa,hca", moe_dispatch="loop", n_shared_experts=0, yarn_factor=1.0, balance_loss_weight=0.0,
         bias_update_speed=0.0, hc_sinkhorn_iters=3),
    dict(layer_types="csa,hca", n_shared_experts=0, n_activated_experts=1, n_hash_layers=0, hc_sinkhorn_iters=3),
], ids=["tiny-3-layers", "hc-dense-mtp2", "qat-fp4-sigmoid", "oracle-plain-no-lora", "anticipatory-random",
        "no-window-all-dense-ffn", "moe-loop-no-shared-no-yarn", "moe-grouped-no-shared-top1"])
def test_compiled_step_matches_eager_toggles(over):
    """The tiny V4 preset (mHC, MoE with a hash layer, CSA / HCA, MTP) at 3 layers and 3 Sinkhorn iterations, and
    toggle combinations that switch the model's toggles away from the preset (residual, QAT, routing score, clamp,
    anticipatory routing, the indexer's modes, Hadamard and loss, the window branch, the low-rank projections, output
    RoPE, the compressor's overlap, the FFN, the MoE's loop dispatch, shared expert, top-1 routing, balance loss and
    bias, YaRN, MTP depth, the sink), through Dynamo + AOTAutograd (aot_eager: the CPU time of
    Inductor's C++ builds is left out)."""
    _compare("tiny", "aot_eager", **over)


def test_compile_setting():
    from dsv4_lab.compilation import AUTO_BLOCKS_MIN_TOKENS as LONG
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # auto: regional compilation on CUDA for a long run only; eager on the CPU, for short runs, and when unknown
    assert wants_compile("auto", cuda, LONG) and regional("auto", cuda)
    assert not wants_compile("auto", cuda, LONG - 1) and not wants_compile("auto", cuda)
    assert not wants_compile("auto", cpu, 100 * LONG)
    assert wants_compile("true", cpu) and not wants_compile("false", cuda, 100 * LONG)
    assert wants_compile("blocks", cpu) and wants_compile("blocks", cuda, 1)
    assert regional("blocks", cpu)
    assert not regional("true", torch.device("cuda"))
    assert TrainConfig().compile == "auto" and TrainConfig(compile=True).compile == "true"
    assert parse_overrides(["compile=false"])[1].compile == "false"
    with pytest.raises(ConfigError, match="compile"):
        parse_overrides(["compile=maybe"])


def test_configure_types_python_floats_like_triton():
    """Inductor's launch signature for a Python-float argument of a hand-written Triton kernel (the attention
    scale, eps): after configure() it is Triton's own type (fp32), not fp64, which promoted the kernels' fp32 loops."""
    import triton
    from torch._inductor import config as inductor_config
    from torch._inductor.codegen import triton_utils
    from torch._inductor.codegen.common import SizeArg
    from torch._inductor.virtualized import V
    if not hasattr(inductor_config, "_use_fp64_for_unbacked_floats"):
        pytest.skip("this torch has no fp64 typing of Python floats")

    class FakeGraph:
        current_device = torch.device("cuda")

    mangle = getattr(triton.runtime.jit, "mangle_type", None)
    triton_type = mangle(0.125) if mangle else "fp32"
    old = inductor_config._use_fp64_for_unbacked_floats
    try:
        with V.set_graph_handler(FakeGraph()):
            inductor_config._use_fp64_for_unbacked_floats = True                  # the default: the failure
            assert triton_utils.signature_of(SizeArg("scale", 0.125), size_dtype=None) == "fp64" != triton_type
            configure()
            assert triton_utils.signature_of(SizeArg("scale", 0.125), size_dtype=None) == triton_type
    finally:
        inductor_config._use_fp64_for_unbacked_floats = old


@pytest.mark.slow
def test_compiled_blocks_static_shapes_and_eager_evaluation():
    """compile=blocks (what training on CUDA runs) and shape changes. A training call with a new batch size compiles
    a graph for that size with static shapes: under Dynamo's automatic-dynamic default it got symbolic sizes, and
    tracing the Triton kernels' launch code with symbolic strides failed on the H200 (AssertionError `Cannot
    construct ConstantVariable ... SymInt`) at the first evaluation (its composite-gain probe runs a batch of one).
    Evaluation (train.evaluate, no-grad, batches of 2 and 1) compiles nothing. A counting backend records every
    graph Dynamo hands over, with the example inputs' shapes."""
    from types import SimpleNamespace

    from dsv4_lab.train import evaluate
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([t for t in example_inputs if isinstance(t, (torch.Tensor, torch.SymInt))])
        return gm.forward

    def symbolic(inputs):
        return any(isinstance(t, torch.SymInt) or (isinstance(t, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in (*t.shape, *t.stride()))) for t in inputs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DSV4LM(ModelConfig.from_preset("tiny", layer_types="csa,hca", mtp_depth=0, hc_sinkhorn_iters=3)).train()
    compile_model(model, regional=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 33), generator=g)
    _step(model, ids[:2, :-1], ids[:2, 1:])
    first = len(graphs)
    assert first >= 2 and not any(symbolic(t) for t in graphs)                 # the blocks and the output path
    batches = SimpleNamespace(val_batch=lambda i: (ids[:2, :-1], ids[:2, 1:]), is_task=False)
    ev = evaluate(model, batches, 2, torch.device("cpu"), contextlib.nullcontext)
    assert len(graphs) == first and ev["val_loss"] > 0 and ev["hc_composite_gain"] > 0
    assert model.training                                                       # evaluate restores the mode
    _step(model, ids[:1, :-1], ids[:1, 1:])                                     # a new batch size in training
    assert len(graphs) > first and not any(symbolic(t) for t in graphs[first:]), [
        [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in gi] for gi in graphs[first:]]
    torch._dynamo.reset()


def test_autotuned_kernels_have_no_defaulted_constexpr():
    """Inductor runs a user-defined Triton kernel under compile=blocks through a launcher that it builds from the
    call's arguments and the autotune config's: a constexpr parameter that has a default and that no config names
    reaches that launcher as a missing argument (`launcher() missing 1 required positional argument`), though the
    eager launch fills it in. Every autotuned kernel of dsv4_lab/kernels gets its constexprs from the call or from
    every config."""
    import importlib
    import inspect
    import pkgutil

    import dsv4_lab.kernels as kernels
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    seen, bad = 0, []
    for info in pkgutil.walk_packages(kernels.__path__, kernels.__name__ + "."):
        for name, obj in vars(importlib.import_module(info.name)).items():
            if not isinstance(obj, Autotuner):
                continue
            seen += 1
            fn = obj.fn
            while not isinstance(fn, JITFunction):
                fn = fn.fn
            sig = inspect.signature(fn.fn)
            for p in fn.params:
                if p.is_constexpr and sig.parameters[p.name].default is not inspect.Parameter.empty:
                    if any(p.name not in cfg.kwargs for cfg in obj.configs):
                        bad.append(f"{info.name}.{name}: {p.name}")
    assert seen >= 10 and not bad, (seen, bad)


def test_training_asks_auto_with_the_tokens_left(tmp_path, monkeypatch):
    """train() hands wants_compile the tokens it has still to train (steps left x batch x sequence), the figure
    compile=auto decides by; on the CPU auto stays eager."""
    import dsv4_lab.compilation as compilation
    from dsv4_lab.train import train
    seen = []
    real = compilation.wants_compile
    monkeypatch.setattr(compilation, "wants_compile", lambda s, d, tokens=None: seen.append((s, d.type, tokens))
                        or real(s, d, tokens))
    mc, tc = parse_overrides(["preset=tiny", "n_layers=1", "layer_types=swa", "mtp_depth=0", "progress=false",
                              "seq_len=32", "batch_size=2", "max_steps=3", "eval_interval=100", "device=cpu",
                              f"run_dir={tmp_path / 'run'}"])
    train(mc, tc)
    assert seen == [("auto", "cpu", 3 * 2 * 32)]
