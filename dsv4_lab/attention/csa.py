"""CSA: compressed sparse attention (docs §2).

The shared V4 layer (attention.py: low-rank q, shared K = V window entries, sink, output de-rotation, grouped
output projection) plus

    entries  C^Comp = compressor(u)           (B, S, c), S = floor(T/m), m = csa_ratio, overlapping (docs §2.3)
    visible  s < floor((t+1)/m)                                                                   (docs §2.4)
    selected S_t = indexer top-k of the visible entries (index_mode: learned | oracle | random | all)
    attend   one softmax with the sink over window entries W_t and selected entries S_t             (docs §2.5)

Indexer training (docs §10, V3.2 recipe; indexer_training.py): while training with indexer_loss_weight > 0 and
index_mode = "learned", the layer records self._aux["indexer_loss"] = weight * KL(p || softmax(I)) over the compressed
entries it attended (all visible ones in the "warmup" stage, the selected set in the "sparse" stage), p = the
attention probabilities summed over heads, L1-normalised, detached. The indexer reads detached inputs, so the KL
trains only the indexer and the (non-differentiable) selection gives the indexer no LM-loss gradient.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels import use_triton
from ..kernels.indexer_topk import indexer_topk
from .attention import Attention
from .compressor import Compressor
from .core import sink_attention
from .indexer import (Indexer, oracle_scores, random_scores, selection_mask, topk_select, visible_entries)
from .indexer_training import indexer_kl_loss, sparse_indexer_kl_loss


class CSAttention(Attention):
    layer_type = "csa"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, "csa")
        self.m = cfg.csa_ratio
        self.compressor = Compressor(cfg.d_model, cfg.head_dim, cfg.csa_ratio, cfg.compressor_overlap, cfg.norm_eps)
        self.indexer = Indexer(cfg)
        self.index_mode = cfg.index_mode
        self.indexer_stage = "sparse"         # "warmup": attend to every visible entry (set_indexer_stage, docs §10)
        self.probe = False                    # True: also compute learned / oracle / random picks into probe_out
        self.probe_out: dict | None = None
        self._pending_scores = None
        self._last_idx = None                 # (B, T, K) top-k picks of the last forward (for the sparse kernel)
        self._sparse_kl = None                # (qI, kI, w) while the kernel path computes the sparse-stage KL

    def _kl_active(self) -> bool:
        return (self.training and torch.is_grad_enabled() and self.cfg.indexer_loss_weight > 0
                and self.index_mode == "learned")

    def compressed(self, u, cq, q, kv, pos):
        B, T, _ = u.shape
        entries = self.compressed_entries(u)                                  # (B, S, c)
        S = entries.shape[1]
        mode = self.index_mode
        dense = self.indexer_stage == "warmup" or mode == "all"
        self._pending_scores = None
        self._sparse_kl = None
        if (mode == "learned" and not dense and not self.probe and S > 0 and self.cfg.window_branch
                and use_triton(self.cfg, u)):
            # kernel path (issue 7): fused indexer scores + top-k, no (B, T, S) score matrix or mask is built; the
            # picks feed the sparse kernel (kernel_core), which also computes the sparse-stage KL when it is active
            # (indexer_training.sparse_indexer_kl_loss). The indexer reads detached inputs (docs §10).
            kl = self._kl_active()
            with torch.set_grad_enabled(kl and torch.is_grad_enabled()):
                ud = u.detach()
                latent = (cq if cq is not None else u).detach()
                qI = self.indexer.queries(latent, pos, self.rope)              # (B, T, n_I, c_I)
                kI = self.indexer.keys(ud, self.rope)                          # (B, S, c_I)
                w = self.indexer.head_weights(ud)                              # (B, T, n_I)
            idx = indexer_topk(qI.detach(), kI.detach().to(qI.dtype), w.detach(), min(self.cfg.index_topk, S),
                               self.m, impl=self.cfg.kernels)                  # (B, T, K) int32, -1 = none
            self._last_idx = idx
            self._sparse_kl = (qI, kI, w) if kl else None
            return entries, (lambda: selection_mask(idx.long(), S))           # mask only if the reference runs
        visible = visible_entries(pos, S, self.m)                             # (T, S)
        vis_b = visible[None].expand(B, T, S)
        scores = {}
        if (mode == "learned" and (not dense or self._kl_active())) or self.probe:
            latent = cq if cq is not None else u                              # u without a low-rank query
            scores["learned"] = self.indexer(u.detach(), latent.detach(), pos, self.rope)   # (B, T, S)
        if (mode == "oracle" and not dense) or self.probe:
            with torch.no_grad():                                             # dense pass over all visible entries
                wmask = self.window_entries_mask(B, T, u.device)
                _, p = sink_attention(q, torch.cat([kv, entries.to(kv.dtype)], 1), torch.cat([wmask, vis_b], -1),
                                      self.attn_sink, self.scale, return_probs=True)
                scores["oracle"] = oracle_scores(p[..., T:])
        if (mode == "random" and not dense) or self.probe:
            scores["random"] = random_scores(B, T, S, u.device)
        self._last_idx = None
        if dense:
            cmask = vis_b
        else:
            idx = topk_select(scores[mode], visible, self.cfg.index_topk)       # (B, T, K), -1 = none
            cmask = selection_mask(idx, S)
            self._last_idx = idx
        if self.probe:
            self.probe_out = {k: topk_select(v.detach(), visible, self.cfg.index_topk) for k, v in scores.items()}
            self.probe_out["visible"] = visible
            self.probe_out["scores"] = {k: v.detach() for k, v in scores.items()}
        if "learned" in scores and self._kl_active():
            self._pending_scores = scores["learned"]
        return entries, cmask

    def wants_compressed_probs(self) -> bool:
        return self._pending_scores is not None

    def on_compressed_probs(self, p: torch.Tensor, cmask: torch.Tensor) -> None:
        loss = indexer_kl_loss(self._pending_scores, p, cmask)
        self._aux["indexer_loss"] = self.cfg.indexer_loss_weight * loss
        self._pending_scores = None

    def kernel_core(self, q, kv, comp):
        """Triton sparse kernel (dsv4_lab/kernels/sparse_attn) over the window + the top-k picks + sink; while the
        indexer KL is active it also returns the softmax's lse, from which the sparse-stage KL is computed over the
        picks. Not used where the layer attends to every visible entry (warm-up stage, mode "all") or for oracle /
        random / probe selection: those run the reference path."""
        idx = self._last_idx
        if comp is None or idx is None or not self.cfg.window_branch or idx.shape[-1] == 0:
            return None
        from ..kernels.sparse_attn import sparse_attn
        entries = comp[0].to(kv.dtype)
        if self._sparse_kl is None:
            return sparse_attn(q, kv, entries, idx, self.attn_sink, self.scale, self.cfg.window,
                               impl=self.cfg.kernels)
        o, lse = sparse_attn(q, kv, entries, idx, self.attn_sink, self.scale, self.cfg.window,
                             impl=self.cfg.kernels, return_lse=True)          # lse (B, T, H) incl. the sink
        qI, kI, w = self._sparse_kl
        self._sparse_kl = None
        loss = sparse_indexer_kl_loss(q.detach(), entries.detach(), idx, lse.detach(), self.scale, qI, kI, w,
                                      impl=self.cfg.kernels)                # Triton: kernels/sparse_kl
        self._aux["indexer_loss"] = self.cfg.indexer_loss_weight * loss
        return o
