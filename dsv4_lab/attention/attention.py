"""The attention layer shared by every layer type (docs §2.1, 2.2, 2.5-2.7, §3): select, then attend.

    u (B, T, d), the chunk at positions p0 .. p0+T-1 (p0 = 0 without a cache, cache.length with one)
      q    = RoPE(rms(wq_b q_norm(wq_a u)))                  (B, T, H, c)   low-rank query, per-head RMSNorm (docs §2.1)
      kv   = RoPE(kv_norm(wkv u)), stored as the cache does  (B, T, c)      one shared K = V entry per token (docs §2.2)
      keys = the uncompressed entries the chunk sees          (B, N, c)      at positions k0 .. p0+T-1: kv itself without a
             cache; with one, the window ring's entries before p0 followed by kv ("dense": every earlier token)
      sel  = self.select(...)  -> Selection: compressed entries, picks, indexer-loss inputs  (csa.py, hca.py; none here)
      o    = self.attend(...)  one softmax with the sink over window + selected entries (docs §2.5), through the
                               kernel dispatchers of dsv4_lab/kernels (naive twin on CPU, Triton on CUDA)
      out  = wo_b(grouped wo_a(de-rotate(o)))                 (B, T, d)                                      (docs §2.7)

Layer types: "dense" attends to every earlier token (the baseline arm, torch's fused SDPA with the sink as a virtual
key), "swa" to the last `window` tokens only; CSA and HCA (csa.py, hca.py) override `select`.

Decode is this same forward with a cache (docs §6): `cache` is inference/cache.py's KVCache; the layer reads its
part, cache.layers[layer_idx], through three calls (window_keys, append_entries, states[...]) and updates it. Nothing
is kept on the module between calls: what the indexer loss needs travels in the Selection to `forward`, where the
loss is recorded in `_aux` (collected by DSV4LM.collect_aux).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..kernels.hca_attn import hca_attn
from ..kernels.sparse_attn import sparse_attn
from ..kernels.sparse_kl import sparse_kl
from ..layers import Linear, RMSNorm, rms_norm
from ..quant import fake_quant_kv
from ..rope import RotaryTable
from .core import dense_causal_attention


@dataclass
class IndexerLossInputs:
    """What the indexer's KL loss needs besides the attention's own q, entries and lse (docs §10): the compressed
    entries the queries attended, idx (B, T, K') int (-1 = none; the picks, or every visible entry in the warm-up
    stage), and the indexer's tensors qI (B, T, n_I, c_I), kI (B, S, c_I), w (B, T, n_I), differentiable."""
    idx: torch.Tensor
    qI: torch.Tensor
    kI: torch.Tensor
    w: torch.Tensor


@dataclass
class Selection:
    """The result of `select` (docs §2.4): which compressed entries each query attends to.

    entries  (B, S, c) compressed entries as stored, or None (dense / swa layers, or no complete block yet)
    idx      (B, T, K) int picks into entries, -1 = none (CSA top-k); None = every visible entry s < floor((t+1)/m)
    kl       the indexer loss inputs while it trains (CSA), else None
    probe    learned / oracle / random picks and scores for study (CSA with layer.probe = True), else None"""
    entries: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    kl: IndexerLossInputs | None = None
    probe: dict | None = None


class Attention(nn.Module):
    layer_type = "dense"
    m = 0                                        # compression ratio of the layer's entries (CSA / HCA)

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
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, impl=cfg.kernels)
            self.wq_b = Linear(cfg.q_lora_rank, H * c, q8)
        else:
            self.wq = Linear(d, H * c, q8)
        # the shared K = V entry (docs §2.2)
        self.wkv = Linear(d, c, q8)
        self.kv_norm = RMSNorm(c, cfg.norm_eps, impl=cfg.kernels) if cfg.qk_norm else None
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
        self.rope = RotaryTable(r, cfg.max_seq_len, cfg.compress_rope_theta if compressed else cfg.rope_theta, yarn,
                                impl=cfg.kernels)
        # the window of uncompressed entries: none for "dense" (every earlier token), 0 when a compressed layer runs
        # without its window branch (docs/methodology.md §3.4)
        self.window = None if layer_type == "dense" else (cfg.window if layer_type == "swa" or cfg.window_branch else 0)
        self.probe = False                    # True: select also returns learned / oracle / random picks (CSA)
        self.probe_out: dict | None = None    # the last forward's Selection.probe (for notebooks and indexer_recall)
        self._aux: dict = {}                  # losses for DSV4LM.collect_aux

    # --- pieces ---------------------------------------------------------------------------------------------
    def query_latent(self, u: torch.Tensor) -> torch.Tensor | None:
        """c^Q (B, T, d_c), shared with the indexer; None without a low-rank query."""
        return self.q_norm(self.wq_a(u)) if self.cfg.q_lora_rank > 0 else None

    def queries(self, u: torch.Tensor, cq: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = u.shape
        q = (self.wq_b(cq) if cq is not None else self.wq(u)).view(B, T, self.n_heads, self.head_dim)
        if self.cfg.qk_norm:
            q = rms_norm(q, self.cfg.norm_eps, self.cfg.kernels)        # per-head weightless RMSNorm
        return self.rope(q, pos)                                        # (B, T, H, c)

    def window_kv(self, u: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kv = self.wkv(u)
        if self.kv_norm is not None:
            kv = self.kv_norm(kv)
        return self.kv_qat(self.rope(kv, pos))                          # (B, T, c)

    def kv_qat(self, kv: torch.Tensor) -> torch.Tensor:
        """KV entries as stored: FP8 E4M3 on the non-RoPE dims (blocks of 64), RoPE dims kept, when quant != none
        (docs §2.2, §6.3); unchanged otherwise."""
        if self.cfg.quant == "none" or kv.shape[1] == 0:
            return kv
        return fake_quant_kv(kv, self.rope_dim)

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

    # --- select ---------------------------------------------------------------------------------------------
    def select(self, u, cq, q, keys, k0: int, p0: int, lc=None) -> Selection:
        """Dense and SWA layers have no compressed entries (CSA / HCA override this)."""
        return Selection()

    def compressed_entries(self, u: torch.Tensor, lc=None, p0: int = 0) -> torch.Tensor:
        """(B, S, c) compressed entries of a CSA / HCA layer's `compressor`, stored like the window KV (docs §2.3).
        With a cache: the chunk streams through the compressor's state, the entries of the blocks it completes are
        appended to the block cache, and all S = floor((p0 + T) / m) entries so far are read back (docs §6.2)."""
        if lc is None:
            return self.kv_qat(self.compressor(u, self.rope))
        normed, first = self.compressor.step(u, lc.states["main"], p0)
        new = self.kv_qat(self.compressor.rotate(normed, self.rope, first))
        return lc.append_entries("comp", new, first, (p0 + u.shape[1]) // self.m)

    # --- attend ---------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, keys: torch.Tensor, k0: int, sel: Selection, p0: int, want_lse: bool = False):
        """One softmax with the sink over the uncompressed entries `keys` (positions k0 ..) and the selected
        compressed entries (docs §2.5). Returns o (B, T, H, c) and lse (B, T, H) (None unless want_lse).

            dense      every key j <= t: fused SDPA (core.dense_causal_attention), no lse
            picks      window + sel.idx: kernels.sparse_attn (CSA; "swa" = no picks)
            all        window + every visible entry s < floor((t+1)/m): kernels.hca_attn (HCA; CSA in mode "all"
                       or the warm-up stage)"""
        impl, keys = self.cfg.kernels, keys.to(q.dtype)
        if self.window is None:
            return dense_causal_attention(q, keys, self.attn_sink, self.scale, q_offset=p0), None
        entries = sel.entries
        if entries is None or entries.shape[1] == 0:                    # window + sink only: no picks at all
            entries = keys[:, :1]
            idx = torch.full((*q.shape[:2], 1), -1, dtype=torch.int32, device=q.device)
        else:
            entries, idx = entries.to(q.dtype), sel.idx
        if idx is not None:
            res = sparse_attn(q, keys, entries, idx, self.attn_sink, self.scale, self.window, q_offset=p0 - k0,
                              impl=impl, return_lse=want_lse)
        else:
            res = hca_attn(q, keys, entries, self.attn_sink, self.scale, self.window, self.m, q_offset=p0,
                           kv_start=k0, impl=impl, return_lse=want_lse)
        return res if want_lse else (res, None)

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, input_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """u (B, T, d) -> (B, T, d). With `cache` (KVCache) the chunk sits at positions cache.length.. and the
        layer's part of the cache is read and updated; the caller advances cache.length."""
        if getattr(cache, "ragged", False):      # sequences of different lengths: this forward once per sequence,
            return cache.attend(self, u)          # each with its own cache (inference/batch_invariance.py)
        lc = cache.layers[self.layer_idx] if cache is not None else None
        p0 = cache.length if cache is not None else 0
        B, T, _ = u.shape
        pos = torch.arange(p0, p0 + T, device=u.device)
        cq = self.query_latent(u)
        q = self.queries(u, cq, pos)
        kv = self.window_kv(u, pos)
        keys, k0 = (kv, 0) if lc is None else lc.window_keys(kv, p0)     # (B, N, c) at positions k0 ..
        sel = self.select(u, cq, q, keys, k0, p0, lc)
        o, lse = self.attend(q, keys, k0, sel, p0, want_lse=sel.kl is not None)
        if sel.kl is not None:                                          # the indexer's KL (docs §10)
            kl = sel.kl
            loss = sparse_kl(q.detach(), sel.entries.detach().to(q.dtype), kl.idx, lse.detach(), self.scale,
                             kl.qI, kl.kI, kl.w, impl=self.cfg.kernels)
            self._aux["indexer_loss"] = self.cfg.indexer_loss_weight * loss
        if self.probe:
            self.probe_out = sel.probe
        return self.output(o, pos)
