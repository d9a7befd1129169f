"""HCA: heavily compressed attention (docs §3).

The shared V4 layer (attention.py) plus m' = hca_ratio non-overlapping compressed entries, attended densely:

    entries  C^Comp_i = RoPE_{i m'}(RMSNorm_w(sum_rho softmax_rho(Z_{i m'+rho} + B_rho) C_{i m'+rho}))   (B, S, c)
    visible  s < floor((t+1)/m')           no indexer, no top-k: every visible entry is attended
    attend   one softmax with the sink over the window entries and all visible entries (docs §2.5)
"""
from __future__ import annotations

from ..config import ModelConfig
from .attention import Attention
from .compressor import Compressor
from .indexer import visible_entries


class HCAttention(Attention):
    layer_type = "hca"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, "hca")
        self.m = cfg.hca_ratio
        self.compressor = Compressor(cfg.d_model, cfg.head_dim, cfg.hca_ratio, overlap=False, eps=cfg.norm_eps)

    def compressed(self, u, cq, q, kv, pos):
        B, T, _ = u.shape
        entries = self.compressed_entries(u)
        visible = visible_entries(pos, entries.shape[1], self.m)             # (T, S)
        return entries, visible[None].expand(B, T, -1)

    def kernel_core(self, q, kv, comp):
        """Triton HCA kernel (dsv4_lab/kernels/hca_attn): window + every visible entry + sink in one softmax."""
        if comp is None or not self.cfg.window_branch or comp[0].shape[1] == 0:
            return None
        from ..kernels.hca_attn import hca_attn
        return hca_attn(q, kv, comp[0].to(kv.dtype), self.attn_sink, self.scale, self.cfg.window, self.m,
                        impl=self.cfg.kernels)
