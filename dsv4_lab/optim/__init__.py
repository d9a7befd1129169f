"""Optimizers (docs §7): Muon with the hybrid Newton-Schulz schedule, and the paper's Muon / AdamW parameter split.

    opt = build_optimizer(model, train_cfg)     # train_cfg.optimizer = "adamw" | "muon"
    for g in opt.param_groups: g["lr"] = lr * g.get("lr_mult", 1.0)
    opt.step(); opt.zero_grad(set_to_none=True); opt.state_dict(); opt.load_state_dict(sd)

Parameter split (paper §2.4, docs §7, `param_split`), first rule that matches wins:
  1. `p._optimizer = "adamw" | "muon"` set by the owning module (explicit override);
  2. every parameter with ndim < 2 -> AdamW: RMSNorm weights, attention sinks, mHC static biases `*base*` and gating
     factors `*scale*`, MoE biases, ...;
  3. the embedding (any nn.Embedding weight) and the prediction head (`head.weight`, also an MTP block's own head)
     -> AdamW;
  4. bias-like matrices, matched on the parameter's own name: `ape` (compressor slot biases), `*sink*`, `*base*`,
     `*scale*`, `*bias*` -> AdamW (UNCONFIRMED in the paper, docs §7: best guess);
  5. everything else with ndim >= 2 -> Muon (attention projections, FFN / expert matrices, gate, mHC `hc_*_fn`).

Muon matrices split into independent blocks (docs §7 "logically independent", UNCONFIRMED): `wo_a` into o_groups
row blocks; mHC's stacked `hc_*_fn` of n_hc*(2+n_hc) rows into (n_hc, n_hc, n_hc^2) rows = W^pre, W^post, W^res
(reference layout); stacked 3-D expert weights per expert. See muon.py.

optimizer = "adamw" (the baseline arm) gives torch.optim.AdamW over every parameter, weight decay on ndim >= 2 only,
betas (beta1, beta2), eps adam_eps. optimizer = "muon" gives `MuonWithAdamW`: Muon (lr, momentum muon_momentum,
Nesterov, decoupled weight_decay, ns_schedule, rms_scale muon_rms_scale) + AdamW for the rest with the same betas,
weight decay on its ndim >= 2 members (embedding, head, ape) and eps = muon_adam_eps (paper: 1e-20). Both share
the same LR schedule (the 0.18 RMS rescale is what lets Muon reuse AdamW's LR, docs §7).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .muon import Muon, orthogonal_update
from .newton_schulz import SCHEDULES, newton_schulz

__all__ = ["newton_schulz", "Muon", "MuonWithAdamW", "build_optimizer", "param_split", "SCHEDULES",
           "orthogonal_update"]

PAPER_ADAMW_EPS = 1e-20                      # paper §2.4 / docs §7 (AdamW eps alongside Muon)
_BIAS_LIKE = re.compile(r"(^ape$|sink|base|scale|bias)")


def param_split(model: nn.Module) -> dict[str, str]:
    """{parameter name: "muon" | "adamw"} by the rules in the module docstring (trainable parameters only)."""
    embed_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        override = getattr(p, "_optimizer", None)
        if override is not None:
            if override not in ("adamw", "muon") or (override == "muon" and p.ndim < 2):
                raise ValueError(f"parameter {name}: _optimizer = {override!r} is not allowed: 'adamw', or 'muon' "
                                 "for a parameter with ndim >= 2")
            out[name] = override
        elif p.ndim < 2:
            out[name] = "adamw"
        elif id(p) in embed_params or (owner == "head" and leaf == "weight") or name == "head.weight":
            out[name] = "adamw"
        elif _BIAS_LIKE.search(leaf):
            out[name] = "adamw"
        else:
            out[name] = "muon"
    return out


def _set_muon_groups(model: nn.Module) -> None:
    """Default row splits for matrices that are several logically independent matrices (docs §2.7, §1.3)."""
    cfg = getattr(model, "cfg", None)
    for name, p in model.named_parameters():
        if hasattr(p, "_muon_groups") or p.ndim < 2:
            continue
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if owner == "wo_a" and leaf == "weight" and cfg is not None and getattr(cfg, "o_groups", 0) > 1:
            p._muon_groups = int(cfg.o_groups)                         # [g*d_g, H*c/g] -> g x [d_g, H*c/g]
        elif cfg is not None and re.fullmatch(r"(hc_\w*fn|fn)", leaf):
            n = int(getattr(cfg, "hc_mult", 0))
            if n and p.shape[-2] == n * (2 + n):
                p._muon_groups = (n, n, n * n)                         # W^pre, W^post, W^res (reference order)


class MuonWithAdamW:
    """One optimizer object over a Muon part and an AdamW part (what `build_optimizer` returns for "muon").

    `param_groups` is the list of both optimizers' groups (the same dicts, so setting group["lr"] works);
    `state_dict()` / `load_state_dict()` round-trip both; `split` maps parameter names to "muon" / "adamw".
    """

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer, split: dict[str, str] | None = None):
        self.muon, self.adamw = muon, adamw
        self.optimizers = [muon, adamw]
        self.split = split or {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != {"muon", "adamw"}:
            raise ValueError(f"optimizer state has keys {sorted(sd)}; a MuonWithAdamW state has 'muon' and 'adamw' "
                             "(was the checkpoint written with optimizer=adamw?)")
        self.muon.load_state_dict(sd["muon"])
        self.adamw.load_state_dict(sd["adamw"])

    def __repr__(self) -> str:
        n_m = sum(v == "muon" for v in self.split.values())
        return f"MuonWithAdamW({n_m} Muon tensors, {len(self.split) - n_m} AdamW tensors)"


def build_optimizer(model: nn.Module, tc) -> torch.optim.Optimizer | MuonWithAdamW:
    """The optimizer of a training run from TrainConfig `tc` (fields optimizer, lr, weight_decay, beta1, beta2,
    adam_eps; for Muon also ns_schedule, muon_momentum, muon_rms_scale, muon_adam_eps with the paper's defaults)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "adamw":
        decay = [p for _, p in named if p.ndim >= 2]
        other = [p for _, p in named if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                  {"params": other, "weight_decay": 0.0}],
                                 lr=tc.lr, betas=betas, eps=tc.adam_eps)
    if tc.optimizer != "muon":
        raise ValueError(f"config field 'optimizer' = {tc.optimizer!r} is not allowed: one of ('adamw', 'muon')")
    _set_muon_groups(model)
    split = param_split(model)
    muon_p = [p for n, p in named if split[n] == "muon"]
    adam_decay = [p for n, p in named if split[n] == "adamw" and p.ndim >= 2]
    adam_other = [p for n, p in named if split[n] == "adamw" and p.ndim < 2]
    muon = Muon([{"params": muon_p, "name": "muon", "lr_mult": 1.0}], lr=tc.lr,
                momentum=getattr(tc, "muon_momentum", 0.95), nesterov=True, weight_decay=tc.weight_decay,
                ns_schedule=getattr(tc, "ns_schedule", "v4"), rms_scale=getattr(tc, "muon_rms_scale", 0.18))
    adamw = torch.optim.AdamW([{"params": adam_decay, "weight_decay": tc.weight_decay, "name": "adamw_decay",
                                "lr_mult": 1.0},
                               {"params": adam_other, "weight_decay": 0.0, "name": "adamw_no_decay", "lr_mult": 1.0}],
                              lr=tc.lr, betas=betas, eps=getattr(tc, "muon_adam_eps", PAPER_ADAMW_EPS))
    return MuonWithAdamW(muon, adamw, split)
