"""torch.compile for training (TrainConfig.compile = auto | true | blocks | false).

    auto   `blocks` on CUDA for a run of at least AUTO_BLOCKS_MIN_TOKENS tokens still to train, eager otherwise and on
           every other device. On CUDA `blocks` trains to the reference path's loss within seed noise (12 seeds,
           benchmarks/README.md, loss parity) at about twice the eager step's tokens/s, but its first step compiles
           for 2-3 minutes: a run of 200 steps x 8 192 tokens took 438 s compiled against 362 s eager. The
           threshold is where the saving per token (4.5 us eager against 2.3 us compiled per token of `small` at 4K:
           run 27's eager step, run 37's compiled one) repays ~150 s of compilation (~70 M tokens), doubled for the
           eager step's speed-ups since run 27. On the CPU compiling costs minutes and gains little at test sizes.
    true   compile the whole model on any device (one graph: Inductor's time grows with depth)
    blocks regional compilation on any device: each residual block (dsv4_lab.model.Block, MTP's included) compiled
           on its own; blocks of one layer type share the compiled code, so compile time grows with the number of
           distinct layer types, not with depth. Two small regions besides: the output path (stream collapse, final
           norm, head: `hidden_to_logits`, main and MTP) and each MTP block's input mix (`MTPBlock.mix`), whose
           fp32 elementwise chains would otherwise run op by op; the embedding and the losses stay eager
    false  never

Settings made before compiling:
  * Inductor types Python-float launch arguments of hand-written Triton kernels (the attention scale, eps, ...) as
    fp64, where Triton itself uses fp32; an fp64 scalar then promotes the kernel's fp32 arithmetic, and a loop that
    accumulates into an fp32 variable fails to compile ("Loop-carried variable ... fp32 ... re-assigned to fp64").
    `_use_fp64_for_unbacked_floats = False` restores Triton's fp32 (the compiled kernels then compute exactly as in
    eager mode). Where the installed torch lacks the switch, it has no fp64 typing either.
  * a recompile limit above the number of layers: per-layer resume frames after a graph break are guarded per
    module instance.
  * static shapes (`dynamic=False`): a call with new shapes compiles a graph for those shapes. With Dynamo's default
    ("automatic dynamic"), the second shape seen marks that dimension symbolic, and tracing the hand-written Triton
    kernels' launch code with symbolic strides fails (`Cannot construct ConstantVariable ... SymInt`, torch 2.11,
    first seen when a compiled training run evaluated on a batch of one).

Evaluation (`eager()`) runs the compiled regions eagerly: the same math, without compiling each block again for
no-grad mode and for every evaluation shape (minutes of Inductor time on the GPU for a few forward passes).
"""
from __future__ import annotations

import torch

CHOICES = ("auto", "true", "blocks", "false")


AUTO_BLOCKS_MIN_TOKENS = 2 ** 27        # compile=auto: `blocks` on CUDA from this many tokens to train (docstring)


def wants_compile(setting: str, device: torch.device, tokens: int | None = None) -> bool:
    """Whether a run compiles; tokens: the tokens it has still to train (None: unknown, so auto stays eager)."""
    if setting not in CHOICES:
        raise ValueError(f"compile = {setting!r} is not allowed: one of {CHOICES}")
    if setting == "auto":
        return device.type == "cuda" and tokens is not None and tokens >= AUTO_BLOCKS_MIN_TOKENS
    return setting in ("true", "blocks")


def regional(setting: str, device: torch.device) -> bool:
    """Whether a compiled model is compiled block by block (compile=blocks, and auto where it compiles)."""
    return setting in ("blocks", "auto")


def configure() -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    if hasattr(inductor_config, "_use_fp64_for_unbacked_floats"):
        inductor_config._use_fp64_for_unbacked_floats = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


def compile_model(model: torch.nn.Module, regional: bool = False, **kw) -> torch.nn.Module:
    """torch.compile(model) after `configure()`; kw go to torch.compile (backend, fullgraph, ...).
    regional: compile each Block in place (nn.Module.compile) and return the model itself."""
    configure()
    kw.setdefault("dynamic", False)
    if not regional:
        return torch.compile(model, **kw)
    from .model import Block
    from .mtp import MTPBlock
    for m in model.modules():
        if isinstance(m, Block):
            m.compile(**kw)
        elif isinstance(m, MTPBlock):
            m.mix = torch.compile(m.mix, **kw)                      # an instance attribute over the method
    lm = getattr(model, "module", model)                            # DDP keeps the model in .module
    if hasattr(lm, "hidden_to_logits"):
        lm.hidden_to_logits = torch.compile(lm.hidden_to_logits, **kw)
    return model


def eager():
    """Context: every compiled function and region runs as eager PyTorch (torch.compiler.set_stance)."""
    return torch.compiler.set_stance("force_eager")
