"""Residual connections around a sub-layer (docs §1). `plain` is the ordinary pre-norm residual
x' = x + F(norm(x)); `hc` / `mhc` (hyper-connections, mhc.py) keep n_hc streams.

Every residual site exposes the same two steps so the Block is written once:
    u, ctx = site.pre(X)        # collapse the state to the sub-layer input (B, T, d)
    X'     = site.post(y, X, ctx)
The state X is (B, T, d) for `plain` and (B, T, n_hc, d) for `hc` / `mhc`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig


class PlainResidual(nn.Module):
    def pre(self, x: torch.Tensor):
        return x, None

    def post(self, y: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        return x + y


def build_residual(cfg: ModelConfig) -> nn.Module:
    if cfg.residual == "plain":
        return PlainResidual()
    from .mhc import HyperConnection
    return HyperConnection(cfg)


def expand_streams(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Embedding -> residual state: (B, T, d) for plain, n_hc identical copies (B, T, n_hc, d) otherwise (docs §1.1)."""
    if cfg.residual == "plain":
        return x
    return x.unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()


def build_head_collapse(cfg: ModelConfig) -> nn.Module | None:
    """The final hc_head collapse of the streams (docs §1.1 step 4); None for plain."""
    if cfg.residual == "plain":
        return None
    from .mhc import HyperHead
    return HyperHead(cfg)
