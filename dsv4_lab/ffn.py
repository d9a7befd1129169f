"""Feed-forward sub-layer: the dense SwiGLU baseline or DeepSeekMoE (docs §5, moe.py)."""
from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig
from .layers import SwiGLU


class DenseFFN(nn.Module):
    """Plain SwiGLU FFN of width d_ff, no clamp: the `ffn="dense"` baseline arm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, 0.0, "fp8" if cfg.quant != "none" else None, cfg.kernels)

    def forward(self, x, input_ids=None):
        return self.mlp(x)


def build_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.ffn == "dense":
        return DenseFFN(cfg)
    from .moe import MoE
    return MoE(cfg, layer_idx)
