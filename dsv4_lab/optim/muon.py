"""Muon with V4's hybrid Newton-Schulz schedule and RMS-matched updates (docs §7, paper §2.4 Algorithm 1).

Per logically independent matrix W (n x m), per step:

    M   <- mu M + G                                   momentum buffer (fp32), mu = 0.95
    U   =  mu M + G   (nesterov)  or  M               Nesterov look-ahead
    O   =  NS(U) * sqrt(max(n, m)) * rms_scale        an orthogonal n x m matrix has RMS 1/sqrt(max(n, m)), so the
                                                      update RMS is rms_scale (0.18): AdamW's LR can be reused
    W   <- W (1 - lr wd) - lr O                       decoupled weight decay, wd = 0.1

Which matrices are "logically independent" (docs §7, UNCONFIRMED part):
  * a 2-D parameter (n, m) is one matrix;
  * a parameter with more dims (..., n, m), e.g. stacked routed-expert weights (E, out, in), is a batch of
    independent matrices: every leading index is orthogonalised on its own (never one E*out x in matrix);
  * a parameter may carry `p._muon_groups`, which splits its rows (dim -2):
      - an int g: the rows are g equal blocks, e.g. the grouped output projection `wo_a` stored [g*d_g, H*c/g] is
        g independent [d_g, H*c/g] matrices (docs §2.7);
      - a tuple of row counts, e.g. (n_hc, n_hc, n_hc*n_hc) for mHC's stacked W^pre / W^post / W^res (docs §1.3).
    `build_optimizer` (optim/__init__.py) sets the attribute for `wo_a` and mHC's `hc_*_fn` when the owning
    module has not set it itself.

Under FSDP2 (dsv4_lab/parallel.py) p, its gradient and the momentum buffer are dim-0 shards (DTensors): the
momentum update is elementwise on the shards; U is all-gathered (full_tensor), every rank orthogonalises the full
matrix (the same computation on every rank), and each rank keeps its own rows of the update.

Matrices of the same shape are stacked and orthogonalised in one batched call (docs/kernels.md §5: small NS calls are
launch-bound). Momentum and the update are computed in fp32 whatever the parameter dtype.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..parallel import full_tensor, shard_like
from .newton_schulz import newton_schulz, resolve_schedule


def muon_groups(p: torch.Tensor):
    """The row split of p for Muon: None (whole matrix / batch of matrices), an int or a tuple of row counts."""
    return getattr(p, "_muon_groups", None)


def _pieces(u: torch.Tensor, groups) -> list[torch.Tensor]:
    """Split u (..., R, C) into independent matrices, each returned as (batch, n, m)."""
    R, C = u.shape[-2:]
    if groups is None or groups == 1:
        return [u.reshape(-1, R, C)]
    if isinstance(groups, int):
        if R % groups:
            raise ValueError(f"_muon_groups = {groups} does not divide the {R} rows of a {tuple(u.shape)} parameter")
        return [u.reshape(*u.shape[:-2], groups, R // groups, C).reshape(-1, R // groups, C)]
    sizes = [int(s) for s in groups]
    if sum(sizes) != R:
        raise ValueError(f"_muon_groups = {groups} (row counts) do not sum to the {R} rows of {tuple(u.shape)}")
    return [t.reshape(-1, t.shape[-2], C) for t in torch.split(u, sizes, dim=-2)]


def _unpieces(pieces: list[torch.Tensor], shape, groups) -> torch.Tensor:
    if groups is None or groups == 1 or isinstance(groups, int):
        return pieces[0].reshape(shape)
    lead = tuple(shape[:-2])
    return torch.cat([t.reshape(*lead, t.shape[-2], t.shape[-1]) for t in pieces], dim=-2)


def orthogonal_update(us: list[torch.Tensor], groups: list, schedule="v4", rms_scale: float = 0.18,
                      ns_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """NS(u) * sqrt(max(n, m)) * rms_scale for each tensor u (split by its groups), same-shape pieces batched."""
    split = [_pieces(u, g) for u, g in zip(us, groups)]
    buckets: dict = defaultdict(list)                                  # (n, m, device) -> [(i, j)]
    for i, ps in enumerate(split):
        for j, t in enumerate(ps):
            buckets[(t.shape[-2], t.shape[-1], t.device)].append((i, j))
    out = [list(ps) for ps in split]
    for (n, m, _), idx in buckets.items():
        stacked = torch.cat([split[i][j] for i, j in idx], 0)         # (sum batch, n, m)
        O = newton_schulz(stacked, schedule, dtype=ns_dtype) * (math.sqrt(max(n, m)) * rms_scale)
        sizes = [split[i][j].shape[0] for i, j in idx]
        for (i, j), o in zip(idx, torch.split(O, sizes, 0)):
            out[i][j] = o
    return [_unpieces(ps, u.shape, g) for ps, u, g in zip(out, us, groups)]


class Muon(torch.optim.Optimizer):
    """Muon for matrix parameters (ndim >= 2); see the module docstring for the exact update.

    Args: lr; momentum mu (0.95); nesterov (True); weight_decay (0.1, decoupled, multiplied by lr);
    ns_schedule ("v4" = 8 x (3.4445, -4.775, 2.0315) + 2 x (2, -1.5, 0.5), "keller5", or a list of (a, b, c));
    rms_scale gamma (0.18); ns_dtype (None = bf16 on CUDA, fp32 on CPU).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, ns_schedule="v4", rms_scale: float = 0.18,
                 ns_dtype: torch.dtype | None = None):
        if not lr >= 0:
            raise ValueError(f"Muon lr = {lr!r} is not allowed: a number >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"Muon momentum = {momentum!r} is not allowed: a number in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"Muon weight_decay = {weight_decay!r} is not allowed: a number >= 0")
        if not rms_scale > 0:
            raise ValueError(f"Muon rms_scale = {rms_scale!r} is not allowed: a positive number")
        resolve_schedule(ns_schedule)                                  # validate early
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_schedule=ns_schedule, rms_scale=rms_scale)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon got a parameter of shape {tuple(p.shape)}: only matrices (ndim >= 2); "
                                     "put vectors in AdamW (see dsv4_lab.optim.build_optimizer)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            params, us = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(g)
                M = st["momentum_buffer"]
                M.mul_(mu).add_(g)                                     # M_t = mu M_{t-1} + G_t
                us.append(g.add(M, alpha=mu) if group["nesterov"] else M.clone())   # mu M_t + G_t
                params.append(p)
            if not params:
                continue
            updates = orthogonal_update([full_tensor(u) for u in us], [muon_groups(p) for p in params],
                                        group["ns_schedule"], group["rms_scale"], self.ns_dtype)
            for p, o in zip(params, updates):
                o = shard_like(o, p)      # this rank's rows under fsdp2
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(o.to(p.dtype), alpha=-lr)
        return loss
