"""One transformer block of DSV4LM (docs §1.2): the attention sub-layer, then the FFN sub-layer, each wrapped by its
own residual site (plain, hc or mhc: residual.py).

    X -> pre -> attn_norm -> Attention (SWA / CSA / HCA / dense; with the KV cache when decoding) -> post
      -> pre -> ffn_norm  -> FFN / MoE (hash routing reads input_ids)                               -> post
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import build_attention
from .config import ModelConfig
from .ffn import build_ffn
from .layers import RMSNorm
from .residual import build_residual


class Block(nn.Module):
    """Attention sub-layer then FFN sub-layer, each wrapped by its own residual site (docs §1.2)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_res = build_residual(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, impl=cfg.kernels)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_res = build_residual(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, impl=cfg.kernels)
        self.ffn = build_ffn(cfg, layer_idx)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        u, ctx = self.attn_res.pre(x)
        x = self.attn_res.post(self.attn(self.attn_norm(u), input_ids, cache), x, ctx)
        u, ctx = self.ffn_res.pre(x)
        return self.ffn_res.post(self.ffn(self.ffn_norm(u), input_ids), x, ctx)
