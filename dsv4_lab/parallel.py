"""Data-parallel training over N processes: `parallel=ddp` (replicated weights) or `parallel=fsdp2` (sharded).

    torchrun --standalone --nproc_per_node=2 -m dsv4_lab train preset=small parallel=fsdp2 ...

* ddp: `DistributedDataParallel`; every rank holds the whole model and optimizer state, gradients are averaged
  by an all-reduce.
* fsdp2: `torch.distributed.fsdp.fully_shard` on every block (the main blocks and the Block inside each MTP
  block), then on the root (embedding, head, norms, the rest of the MTP blocks). Parameters become DTensors sharded
  on dim 0; each rank keeps and updates only its shard (AdamW works on shards as is; Muon gathers the full matrix,
  optim/muon.py). Parameters that are not trained (the MoE router's bias, updated identically on every rank from
  all-reduced loads) stay whole. Parameters stay fp32 (all-gathers in fp32; bf16 is autocast's, as in one
  process). Tested on CPU with gloo (tests/test_parallel.py); the NCCL path is the same code, not yet run on GPUs.
  The indexer's dense warm-up stage is refused under fsdp2, and so is the MoE's loop dispatch on torch < 2.12
  (`check_supported`).

Both modes see the same global batch as one process: every rank makes the global batch of the step and keeps
its own rows (`rank_slice`), so the mean loss over ranks is the one-process loss up to fp32 summation order.

One known difference under fsdp2: a trainable parameter that no rank's tokens reach in a step (an expert without
tokens under moe_dispatch=loop) gets a zero gradient, not none, so AdamW / Muon still decay it and its moments
that step, where one process and ddp skip it. The grouped dispatch (default) and the tiny / small presets give
every parameter a gradient.

Checkpoints are full (unsharded) tensors in the one-process layout (`full_state`): a checkpoint written with any
number of ranks, in either mode, resumes with any other (`load_full_state`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

MODES = ("ddp", "fsdp2")


def fsdp2_reduces_unused() -> bool:
    """Whether the installed FSDP2 can reduce-scatter a zero gradient for a parameter that got none on this rank
    (`FSDPModule.set_reduce_scatter_unused_params`, torch >= 2.12). Without it, a parameter that one rank's tokens
    never reach drops out of that rank's reduce-scatter only, and the ranks' collectives no longer match."""
    from torch.distributed.fsdp import FSDPModule
    return hasattr(FSDPModule, "set_reduce_scatter_unused_params")


def check_supported(mc, mode: str) -> None:
    """ConfigError for the combinations that do not run under fsdp2 (ddp runs both):
      * the indexer's dense warm-up stage: it freezes every parameter but the indexers', and fully_shard's backward
        then crashes (a whole block without a trainable parameter);
      * the MoE's loop dispatch where FSDP2 cannot reduce-scatter unused parameters (torch < 2.12): the loop leaves
        an expert without tokens on this rank with no gradient. The grouped dispatch gives every expert a gradient
        (zero without tokens), so it runs on any torch."""
    from .config import ConfigError
    if mode == "fsdp2" and mc.indexer_warmup_steps and "csa" in mc.layer_types:
        raise ConfigError(f"config field 'indexer_warmup_steps' = {mc.indexer_warmup_steps} is not allowed with "
                          "parallel=fsdp2 on several ranks: 0, or use parallel=ddp")
    if mode == "fsdp2" and mc.ffn == "moe" and mc.moe_dispatch == "loop" and not fsdp2_reduces_unused():
        raise ConfigError(f"config field 'moe_dispatch' = 'loop' is not allowed with parallel=fsdp2 on torch "
                          f"{torch.__version__} (FSDP2 reduce-scatters unused parameters from torch 2.12): grouped, "
                          "or use parallel=ddp")


def _dtensor_cls():
    from torch.distributed.tensor import DTensor
    return DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (fsdp2 DTensor) one: every rank must call it (all-gather); a plain tensor as is."""
    return t.full_tensor() if isinstance(t, _dtensor_cls()) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """full placed as `like` is: this rank's shard when like is a DTensor (no communication: every rank holds the
    same full tensor), else full as is."""
    DTensor = _dtensor_cls()
    if not isinstance(like, DTensor) or isinstance(full, DTensor):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows [rank * B/world, (rank+1) * B/world) of a global batch (B, ...); B is a multiple of world."""
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]


def wrap(model: nn.Module, mode: str, device: torch.device, find_unused: bool) -> nn.Module:
    """The module to call forward on: a DDP wrapper (ddp) or the model itself, sharded in place (fsdp2)."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
    if mode != "fsdp2":
        raise ValueError(f"parallel = {mode!r} is not allowed: one of {MODES}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units = list(model.blocks)
    if getattr(model, "mtp", None) is not None:
        # only the Block inside an MTP block: its hc_head and norm are used outside its forward (mtp.predict)
        units += [layer.block for layer in model.mtp.layers]
    # parameters that are not trained (the MoE router's load-balancing bias, updated in place identically on
    # every rank from all-reduced loads) stay whole, plain tensors on every rank
    frozen = {p for p in model.parameters() if not p.requires_grad}
    for blk in units:
        fully_shard(blk, mesh=mesh, ignored_params=frozen)
    fully_shard(model, mesh=mesh, ignored_params=frozen)
    # an expert (or any parameter) that one rank's tokens never reach still joins the reduce-scatter with a zero
    # gradient, so every rank reduce-scatters the same tensors (older FSDP2: check_supported keeps such configs out)
    if fsdp2_reduces_unused():
        model.set_reduce_scatter_unused_params(True)
    return model


def _full(obj):
    """obj with every DTensor gathered into a full CPU tensor and every tensor moved to the CPU (nested dicts and
    lists). Under fsdp2 every rank must call it (all-gathers)."""
    if torch.is_tensor(obj):
        return full_tensor(obj).detach().cpu()
    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_full(v) for v in obj)
    return obj


def full_state(model: nn.Module, opt) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) as full CPU tensors, the layout of an unwrapped one-process run.
    Optimizer states are keyed by parameter index (model.named_parameters order, the same in every mode)."""
    return _full(model.state_dict()), _full(opt.state_dict())


def load_full_state(model: nn.Module, opt, model_sd: dict, opt_sd: dict) -> None:
    """Load a `full_state` pair into a plain, DDP-wrapped or fsdp2-sharded model and its optimizer."""
    own = model.state_dict()
    model.load_state_dict({k: shard_like(v, own[k]) if k in own and torch.is_tensor(v) else v
                           for k, v in model_sd.items()})
    opt.load_state_dict(opt_sd)
    DTensor = _dtensor_cls()
    for o in getattr(opt, "optimizers", [opt]):            # MuonWithAdamW holds two optimizers
        for p, st in o.state.items():
            if not isinstance(p, DTensor):
                continue
            for k, v in st.items():                         # moments / momentum: full -> this rank's shard
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = shard_like(v, p)


class RankBatches:
    """This rank's rows of every global batch of a `data.Batches` (made with the global batch size, rank 0)."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    @property
    def is_task(self) -> bool:
        return self.batches.is_task

    def train_batch(self, step: int):
        return tuple(rank_slice(t, self.rank, self.world) for t in self.batches.train_batch(step))

    def val_batch(self, i: int):
        return tuple(rank_slice(t, self.rank, self.world) for t in self.batches.val_batch(i))
