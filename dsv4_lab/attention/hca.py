"""HCA: heavily compressed attention (docs §3).

The shared V4 layer (attention.py) plus m' = hca_ratio non-overlapping compressed entries, attended densely:

    entries  C^Comp_i = RoPE_{i m'}(RMSNorm_w(sum_rho softmax_rho(Z_{i m'+rho} + B_rho) C_{i m'+rho}))   (B, S, c)
    select   no indexer, no top-k: every visible entry s < floor((t+1)/m') (Selection.idx = None)
    attend   one softmax with the sink over the window entries and all visible entries (kernels.hca_attn, docs §2.5)
"""
from __future__ import annotations

from ..config import ModelConfig
from .attention import Attention, Selection
from .compressor import Compressor


class HCAttention(Attention):
    layer_type = "hca"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, "hca")
        self.m = cfg.hca_ratio
        self.compressor = Compressor(cfg.d_model, cfg.head_dim, cfg.hca_ratio, overlap=False, eps=cfg.norm_eps,
                                     impl=cfg.kernels)

    def select(self, u, cq, q, keys, k0, p0, lc=None) -> Selection:
        return Selection(entries=self.compressed_entries(u, lc, p0))          # (B, S, c), all visible attended
