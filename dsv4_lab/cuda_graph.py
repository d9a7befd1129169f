"""A training step's forward and backward as one CUDA graph (TrainConfig.cuda_graph, docs/kernels.md §10).

The lab's small models are launch-bound on a GPU: a 4-layer V4 step issues thousands of small kernels, and the
host spends longer issuing them than the GPU spends running them. A CUDA graph records the kernels of one
forward + backward once and replays them with one launch per step.

    step = GraphedStep(model, amp)
    for ...:
        key = (indexer_stage, mtp_weight, routing_key(model))   # the host state the forward reads
        out = step(x, y, key=key)                            # forward + backward; p.grad holds this step's gradients
        clip_grad_norm_(...); opt.step()                     # eager, as without graphs; never zero_grad here

What is captured: `model(x, y)` under `amp()` and `out.loss.backward()`. Everything else stays eager: the
optimizer step (its LR changes every step), gradient clipping, the MoE bias update, logging, evaluation.

Streams. Warm-up steps and the capture run on one side stream of their own (the current stream waits for it):
autograd records on which stream each parameter's gradient accumulator was created, and an accumulator made on the
default stream but still alive (held by an earlier step's outputs) makes the capture wait on the default stream,
which a capture may not do. The outputs handed back are detached for the same reason.

Static memory. The batch is copied into fixed input buffers before each replay; the outputs (`out.loss`, the aux
scalars) are the graph's own tensors, overwritten by every replay. Gradients are captured with every `.grad` unset,
so the captured backward *writes* them (never accumulates) into buffers of the graph's pool, and each replay
rewrites them in place: between steps nobody may set them to None.

Host state the forward reads is baked into the graph as constants; `key` names it (the indexer stage, the MTP loss
weight, anticipatory routing on/off per router: moe.routing_key). Tensors the forward reads that change between
steps keep their addresses and change in place (the anticipatory router's weight snapshots are such buffers,
written by eager code between replays). When the key changes, the graph is dropped, the next `warmup` steps run
eagerly (new code paths JIT-compile their Triton kernels outside a capture) and the step after them is captured
anew. The first `warmup` steps of a run are eager for the same reason.

Same numbers: a replay launches the same kernels on the same data as the eager step, so a graphed run equals an
eager one bit for bit where eager runs repeat themselves (deterministic mode: tests/test_cuda_graph.py on the GPU);
with the Triton kernels' fp32 atomics it stays within the spread of two eager runs (benchmarks/README.md). Under
replay no Python of the forward runs, so host-side timings taken inside it are not measured (the anticipatory
router's per-forward overhead); the run's wall-clock time_s is. Not supported, refused by the config: compile (the compiled model has
its own graphs), several processes, the CPU.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Callable, Hashable

import torch


class GraphedStep:
    """Forward + backward of `model(x, y)` on CUDA, replayed from a graph once warmed up (see the module doc)."""

    def __init__(self, model: torch.nn.Module, amp: Callable = nullcontext, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"GraphedStep warmup = {warmup!r} is not allowed: an integer >= 1 (the first steps "
                             "JIT-compile kernels, which cannot happen inside a capture)")
        self.model, self.amp, self.warmup = model, amp, warmup
        self.key: Hashable = object()              # no key seen yet
        self.eager_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[torch.Tensor, torch.Tensor] | None = None
        self.static_out = None
        self.captures = 0                          # graphs recorded so far (one per key, normally)
        self.replays = 0
        self.stream: torch.cuda.Stream | None = None      # warm-ups and captures (created on the first CUDA step)

    def _zero_grads(self) -> None:
        for p in self.model.parameters():          # every .grad unset: backward writes, never accumulates
            p.grad = None

    def _side(self):
        """A context that runs on the side stream after everything queued so far, and makes the current stream
        wait for it afterwards (no stream on the CPU: the eager steps run there as they are, for tests)."""
        if not on_cuda(self.model):
            return nullcontext()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return _on_side_stream(self.stream)

    def _eager(self, x: torch.Tensor, y: torch.Tensor):
        self._zero_grads()
        with self._side():
            with self.amp():
                out = self.model(x, y)
            out.loss.backward()
        return detached(out)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.graph, self.static_out = None, None   # the old graph's pool goes with it
        self._zero_grads()
        self.static_in = (x.clone(), y.clone())
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=self.stream):      # records, runs nothing: the first replay computes it
            with self.amp():
                out = self.model(*self.static_in)
            out.loss.backward()
        self.graph, self.static_out = g, detached(out)
        self.captures += 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, key: Hashable = None):
        """This step's forward and backward: returns the model output; p.grad holds the gradients."""
        if key != self.key:                        # new host state: warm its code path up eagerly, then capture
            self.key, self.eager_left = key, self.warmup
            self.graph, self.static_out = None, None
        if self.eager_left > 0:
            self.eager_left -= 1
            return self._eager(x, y)
        if self.graph is None:
            self._capture(x, y)
        self.static_in[0].copy_(x, non_blocking=True)
        self.static_in[1].copy_(y, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.static_out


def detached(out):
    """The model output with every tensor detached (same memory; no reference to the autograd graph)."""
    det = lambda v: v.detach() if torch.is_tensor(v) else v        # noqa: E731
    return dataclasses.replace(out, **{f.name: det(getattr(out, f.name)) for f in dataclasses.fields(out)
                                       if f.name != "aux"}, aux={k: det(v) for k, v in out.aux.items()})


def on_cuda(model: torch.nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.is_cuda


class _on_side_stream:
    def __init__(self, stream: "torch.cuda.Stream"):
        self.stream = stream

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream())
        self.ctx = torch.cuda.stream(self.stream)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        torch.cuda.current_stream().wait_stream(self.stream)
        return False
