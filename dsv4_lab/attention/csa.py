"""CSA: compressed sparse attention (docs §2).

The shared V4 layer (attention.py: low-rank q, shared K = V window entries, sink, output de-rotation, grouped
output projection) with this `select`:

    entries  C^Comp = compressor(u)           (B, S, c), S = floor(T/m), m = csa_ratio, overlapping (docs §2.3)
    visible  s < floor((t+1)/m)                                                                   (docs §2.4)
    picks    S_t = top-K of the visible entries, K = min(index_topk, S), by index_mode:
               learned  the lightning indexer's scores (indexer.py; kernels.indexer_topk: scores + top-k fused)
               oracle   the main attention's probabilities over every visible entry, summed over heads
               random   a fixed pseudo-random score per (row, position, entry) (indexer.random_scores)
               all      no top-k: every visible entry (the warm-up stage of indexer training too)
    attend   one softmax with the sink over the window entries and the picks (kernels.sparse_attn, docs §2.5)

Every top-k goes through the one top-k of kernels/indexer_topk (int32 picks sorted by score, ties to the lower
index, -1 where fewer than K entries are visible).

Indexer training (docs §10, V3.2 recipe; indexer_training.py): while training with indexer_loss_weight > 0 and
index_mode = "learned", the Selection carries the indexer's (qI, kI, w) and the attended entries (the picks, or every
visible entry in the "warmup" stage); Attention.forward then records weight * KL(p || softmax(I)) over them, p = the
attention probabilities summed over heads, L1-normalised, detached (kernels.sparse_kl, from the attention's lse). The
indexer reads detached inputs, so the KL trains only the indexer and the (non-differentiable) selection gives the
indexer no LM-loss gradient.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels.hca_attn import hca_attn
from ..kernels.indexer_topk import MXFP4Keys, indexer_topk, topk_indices
from .attention import Attention, IndexerLossInputs, Selection
from .compressor import Compressor
from .indexer import Indexer, random_scores, visible_entries


class CSAttention(Attention):
    layer_type = "csa"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, "csa")
        self.m = cfg.csa_ratio
        self.compressor = Compressor(cfg.d_model, cfg.head_dim, cfg.csa_ratio, cfg.compressor_overlap, cfg.norm_eps,
                                     impl=cfg.kernels)
        self.indexer = Indexer(cfg)
        self.index_mode = cfg.index_mode
        self.indexer_stage = "sparse"         # "warmup": attend to every visible entry (set_indexer_stage, docs §10)

    def select(self, u, cq, q, keys, k0, p0, lc=None) -> Selection:
        B, T, _ = u.shape
        cfg, mode = self.cfg, self.index_mode
        entries = self.compressed_entries(u, lc, p0)                          # (B, S, c)
        S = entries.shape[1]
        K = min(cfg.index_topk, S)                                            # index_topk resolved here, once
        every = mode == "all" or self.indexer_stage == "warmup"               # attend to every visible entry
        kl_on = (self.training and torch.is_grad_enabled() and cfg.indexer_loss_weight > 0 and mode == "learned"
                 and S > 0)
        proj = None                                                           # the indexer's (qI, kI, w)
        if (mode == "learned" and not every) or kl_on:
            with torch.set_grad_enabled(kl_on):                               # detached inputs (docs §10)
                latent = cq if cq is not None else u                          # u without a low-rank query
                # packed: without the KL, a "paper" cache hands the keys over as stored (MXFP4), same values
                proj = self.indexer.project(u.detach(), latent.detach(), p0, self.rope, lc, packed=not kl_on)
        idx = None
        if not every and S > 0:
            if mode == "learned":
                qI, kI, w = (t if isinstance(t, MXFP4Keys) else t.detach() for t in proj)
                idx = indexer_topk(qI, kI, w, K, self.m, q_offset=p0, impl=cfg.kernels,          # (B, T, K)
                                   score_dtype=cfg.index_score_dtype)
            else:
                idx = topk_indices(self.scores(mode, u, q, keys, k0, entries, p0), K)
        kl = None
        if kl_on:
            attended = idx if idx is not None else self.every_visible(B, T, S, p0, u.device)
            kl = IndexerLossInputs(attended, *proj)
        probe = None
        if self.probe:
            probe = {**self.probe_picks(u, cq, q, keys, k0, entries, p0, K), "attended": idx}
        return Selection(entries, idx, kl, probe)

    # --- selectors other than the learned one (study tools, docs/methodology.md §3.10) -------------------------
    def scores(self, mode: str, u, q, keys, k0: int, entries, p0: int) -> torch.Tensor:
        """(B, T, S) scores of the "oracle" / "random" selector, invisible entries at -inf."""
        B, T = q.shape[:2]
        vis = visible_entries(torch.arange(p0, p0 + T, device=q.device), entries.shape[1], self.m)   # (T, S)
        if mode == "oracle":
            sc = self.oracle_scores(q, keys, k0, entries, p0)
        else:
            sc = random_scores(B, p0, T, entries.shape[1], self.layer_idx, q.device)
        return sc.masked_fill(~vis, float("-inf"))

    @torch.no_grad()
    def oracle_scores(self, q, keys, k0: int, entries, p0: int) -> torch.Tensor:
        """The main attention's probabilities of the compressed entries, attended densely over every visible entry
        (with the window and the sink), summed over heads: p_{t,s} = sum_h exp(scale q_{t,h} . c_s - lse_{t,h}).
        (B, T, S), in q's compute dtype (fp32 at least)."""
        ct = torch.promote_types(q.dtype, torch.float32)
        _, lse = hca_attn(q, keys.to(q.dtype), entries.to(q.dtype), self.attn_sink, self.scale, self.window, self.m,
                          q_offset=p0, kv_start=k0, impl=self.cfg.kernels, return_lse=True)     # (B, T, H)
        z = torch.einsum("bthd,bsd->bths", q.to(ct), entries.to(ct)) * self.scale
        return torch.exp(z - lse.to(ct)[..., None]).sum(2)

    def every_visible(self, B: int, T: int, S: int, p0: int, device) -> torch.Tensor:
        """(B, T, S) int32: entry s where visible to the query at p0 + t, else -1 (the warm-up stage's KL set)."""
        vis = visible_entries(torch.arange(p0, p0 + T, device=device), S, self.m)
        s = torch.arange(S, device=device, dtype=torch.int32)
        return torch.where(vis, s, -1).to(torch.int32)[None].expand(B, T, S)

    @torch.no_grad()
    def probe_picks(self, u, cq, q, keys, k0, entries, p0: int, K: int) -> dict:
        """Picks and scores of all three selectors (indexer_recall, notebooks): {"learned" | "oracle" | "random":
        (B, T, K) int32 picks, "scores": {name: (B, T, S)}, "visible": (T, S)}; `select` adds "attended": the picks
        the layer attended to (kernel or reference; None = every visible entry)."""
        T, S = q.shape[1], entries.shape[1]
        pos = torch.arange(p0, p0 + T, device=q.device)
        vis = visible_entries(pos, S, self.m)
        latent = cq if cq is not None else u
        scores = {"learned": self.indexer(u, latent, pos, self.rope).masked_fill(~vis, float("-inf")),
                  "oracle": self.scores("oracle", u, q, keys, k0, entries, p0),
                  "random": self.scores("random", u, q, keys, k0, entries, p0)}
        out = {name: topk_indices(sc, K) for name, sc in scores.items()}
        out["scores"], out["visible"] = scores, vis
        return out
