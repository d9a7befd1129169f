"""The attention layer shared by every layer type (docs §2.1, 2.2, 2.5-2.7, §3).

    u (B, T, d) -> low-rank query c^Q = q_norm(wq_a u) -> q = wq_b c^Q, per-head weightless RMSNorm, RoPE (last r)
                -> one shared K = V entry per token: k = kv_norm(wkv u), RoPE
                -> compressed entries from the layer's compressor (CSA / HCA, subclasses)
                -> one softmax over window + compressed entries with the sink (core.sink_attention)
                -> de-rotate the output's RoPE dims at the query position
                -> grouped low-rank output projection wo_a (block-diagonal over head groups) then wo_b

Layer types: "dense" attends to every earlier token (the baseline arm), "swa" to the last `window` tokens only;
CSA and HCA (csa.py, hca.py) add compressed entries by overriding `compressed`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..kernels import use_triton
from ..layers import Linear, RMSNorm, rms_norm
from ..rope import RotaryTable
from .core import dense_causal_attention, sink_attention, window_mask


class Attention(nn.Module):
    layer_type = "dense"

    def __init__(self, cfg: ModelConfig, layer_idx: int, layer_type: str = "dense"):
        super().__init__()
        self.cfg, self.layer_idx, self.layer_type = cfg, layer_idx, layer_type
        d, H, c, r = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        self.n_heads, self.head_dim, self.rope_dim = H, c, r
        self.scale = 1.0 / math.sqrt(c)                               # 1/sqrt(c), no YaRN mscale (docs §2.5)
        q8 = "fp8" if cfg.quant != "none" else None
        # queries (docs §2.1)
        if cfg.q_lora_rank > 0:
            self.wq_a = Linear(d, cfg.q_lora_rank, q8)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, H * c, q8)
        else:
            self.wq = Linear(d, H * c, q8)
        # the shared K = V entry (docs §2.2)
        self.wkv = Linear(d, c, q8)
        self.kv_norm = RMSNorm(c, cfg.norm_eps) if cfg.qk_norm else None
        # sink logit per head (docs §2.5)
        self.attn_sink = nn.Parameter(torch.zeros(H)) if cfg.attn_sink else None
        # output projection (docs §2.7)
        if cfg.o_groups > 0:
            g = cfg.o_groups
            self.wo_a = Linear(H * c // g, g * cfg.o_lora_rank)       # stored [g*d_g, H*c/g], viewed [g, d_g, H*c/g]
            self.wo_b = Linear(g * cfg.o_lora_rank, d, q8)
        else:
            self.wo = Linear(H * c, d, q8)
        # RoPE table: compressed layers use compress_rope_theta + YaRN, dense / SWA layers rope_theta (docs §2.6)
        compressed = layer_type in ("csa", "hca")
        yarn = dict(factor=cfg.yarn_factor, original_seq_len=cfg.yarn_original_seq_len,
                    beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow) if compressed else None
        self.rope = RotaryTable(r, cfg.max_seq_len, cfg.compress_rope_theta if compressed else cfg.rope_theta, yarn)
        self._aux: dict = {}

    # --- pieces ---------------------------------------------------------------------------------------------
    def query_latent(self, u: torch.Tensor) -> torch.Tensor | None:
        """c^Q (B, T, d_c), shared with the indexer; None without a low-rank query."""
        return self.q_norm(self.wq_a(u)) if self.cfg.q_lora_rank > 0 else None

    def queries(self, u: torch.Tensor, cq: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = u.shape
        q = (self.wq_b(cq) if cq is not None else self.wq(u)).view(B, T, self.n_heads, self.head_dim)
        if self.cfg.qk_norm:
            q = rms_norm(q, self.cfg.norm_eps)                          # per-head weightless RMSNorm
        return self.rope(q, pos)                                        # (B, T, H, c)

    def window_kv(self, u: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kv = self.wkv(u)
        if self.kv_norm is not None:
            kv = self.kv_norm(kv)
        return self.kv_qat(self.rope(kv, pos))                          # (B, T, c)

    def kv_qat(self, kv: torch.Tensor) -> torch.Tensor:
        """KV entries as stored: FP8 E4M3 on the non-RoPE dims (blocks of 64), RoPE dims kept, when quant != none
        (docs §2.2, §6.3); unchanged otherwise."""
        if self.cfg.quant == "none":
            return kv
        from ..quant import fake_quant_kv
        return fake_quant_kv(kv, self.rope_dim)

    def compressed_entries(self, u: torch.Tensor) -> torch.Tensor:
        """(B, S, c) compressed entries of a CSA / HCA layer's `compressor`, stored like the window KV (docs §2.3)."""
        return self.kv_qat(self.compressor(u, self.rope))

    def compressed(self, u, cq, q, kv, pos):
        """Compressed entries and their visibility: (entries (B, S, c), mask (B, T, S) bool) or None."""
        return None

    def output(self, o: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        if self.cfg.output_rope:
            o = self.rope(o, pos, inverse=True)                         # de-rotate at the query position
        if self.cfg.o_groups > 0:
            g = self.cfg.o_groups
            o = o.reshape(B, T, g, -1)                                  # consecutive heads per group
            w = self.wo_a.weight.view(g, self.cfg.o_lora_rank, -1)      # (g, d_g, H*c/g)
            o = torch.einsum("btgi,gdi->btgd", o, w.to(o.dtype)).flatten(2)
            return self.wo_b(o)
        return self.wo(o.flatten(2))

    def window_size(self) -> int | None:
        if self.layer_type == "dense":
            return None
        return self.cfg.window

    def window_entries_mask(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T, T) bool: which uncompressed entries each query sees (docs §2.5); all False when a compressed
        layer runs with window_branch=False (docs/methodology.md §3.4)."""
        wmask = window_mask(T, self.window_size(), device)[None].expand(B, T, T)
        if self.layer_type in ("csa", "hca") and not self.cfg.window_branch:
            wmask = torch.zeros_like(wmask)
        return wmask

    # hooks for layers that need the attention probabilities of their compressed entries (CSA indexer loss)
    def wants_compressed_probs(self) -> bool:
        return False

    def on_compressed_probs(self, p: torch.Tensor, cmask: torch.Tensor) -> None:
        """p (B, H, T, S): attention probabilities of the compressed columns; cmask (B, T, S) their mask."""

    # fused kernels (dsv4_lab/kernels; issue 7): the same core attention through the Triton path
    def kernel_core(self, q: torch.Tensor, kv: torch.Tensor, comp) -> torch.Tensor | None:
        """o (B, T, H, c) from the layer's kernel, or None where no kernel applies (then the reference runs).
        Here: the window-only layer ("swa") is the CSA kernel with no picks (every index -1: window + sink only);
        dense layers never get here (fused SDPA with the sink as a virtual key, core.dense_causal_attention)."""
        if self.layer_type != "swa" or comp is not None:
            return None
        from ..kernels.sparse_attn import sparse_attn
        B, T = q.shape[:2]
        none = torch.full((B, T, 1), -1, dtype=torch.int32, device=q.device)       # (B, T, 1): no compressed pick
        return sparse_attn(q, kv, kv[:, :1], none, self.attn_sink, self.scale, self.cfg.window,
                           impl=self.cfg.kernels)

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, input_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        if cache is not None:                      # decode / chunked prefill with the KV cache (docs §6)
            from ..inference.cache import cached_attention
            return cached_attention(self, u, cache)
        B, T, _ = u.shape
        pos = torch.arange(T, device=u.device)
        cq = self.query_latent(u)
        q = self.queries(u, cq, pos)
        kv = self.window_kv(u, pos)
        comp = self.compressed(u, cq, q, kv, pos)       # (entries (B, S, c), mask (B, T, S) or a callable making it)
        if comp is None and self.layer_type == "dense":
            # causal MQA (the sink folded in as a virtual key): fused SDPA, the reference's numbers without (T, T)
            o = dense_causal_attention(q, kv, self.attn_sink, self.scale)
        elif not (comp is not None and self.wants_compressed_probs()) and use_triton(self.cfg, q) and \
                (o_k := self.kernel_core(q, kv, comp)) is not None:
            o = o_k                                     # no (T, T) mask is ever built on this path
        else:
            # the reference: one softmax over [window entries | compressed entries] with explicit masks
            wmask = self.window_entries_mask(B, T, u.device)                  # (B, T, T)
            if comp is not None:
                entries, cmask = comp
                cmask = cmask() if callable(cmask) else cmask                 # (B, T, S)
                kv_all, mask = torch.cat([kv, entries.to(kv.dtype)], 1), torch.cat([wmask, cmask], -1)
            else:
                kv_all, mask = kv, wmask
            if comp is not None and self.wants_compressed_probs():
                o, p = sink_attention(q, kv_all, mask, self.attn_sink, self.scale, return_probs=True)
                self.on_compressed_probs(p[..., T:], cmask)
            else:
                o = sink_attention(q, kv_all, mask, self.attn_sink, self.scale)
        return self.output(o, pos)
