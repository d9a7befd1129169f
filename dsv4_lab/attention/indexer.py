"""Lightning indexer of CSA: which compressed entries each query attends to (docs §2.4).

    keys    K^I_s = Hadamard(RoPE_{s*m}(RMSNorm_w(compressor_I(u))))        (B, S, c_I)   own overlapping compressor
    queries q^I_t = Hadamard(RoPE_t(wq_b c^Q_t))                             (B, T, n_I, c_I)   reuses the main latent
    weights w_t   = weights_proj(u_t) * c_I^-1/2 * n_I^-1/2                  (B, T, n_I)   from the block input u
    score   I_{t,s} = sum_h w_{t,h} ReLU(q^I_{t,h} . K^I_s)                  (B, T, S)
    visible s < floor((t+1)/m)   (the block ending exactly at t is visible; invisible entries score -inf)
    select  S_t = TopK_s(I_{t,s}),  K = min(index_topk, S); a pick that is not visible becomes -1 (ignored)

With cfg.quant == "fp4", q^I and K^I go through MXFP4 fake quantisation after the Hadamard rotation (docs §8.2).
Without a low-rank query (q_lora_rank = 0) there is no latent c^Q: the indexer's wq_b then reads the block input u
(d -> n_I c_I) -- our choice, documented here; it keeps "no separate down-projection" of the spec.

Modes (cfg.index_mode, docs §10 / docs/methodology.md §3.10): "learned" (the scores above), "oracle" (top-k of the main
attention's own probabilities over all visible entries, summed over heads: the best a selector could do),
"random" (uniformly random visible entries), "all" (every visible entry, HCA-like dense; the warm-up stage).
The functions below take already-projected tensors so a decode cache can reuse them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..layers import Linear
from .compressor import Compressor
from .hadamard import hadamard_rotate


def visible_entries(pos: torch.Tensor, S: int, m: int) -> torch.Tensor:
    """(T, S) bool: compressed entry s is visible to the query at position t iff s < floor((t+1)/m) (docs §2.4)."""
    return torch.arange(S, device=pos.device)[None, :] < torch.div(pos[:, None] + 1, m, rounding_mode="floor")


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """I_{t,s} = sum_h w_{t,h} ReLU(q_{t,h} . k_s). q (B, T, n_I, c_I), k (B, S, c_I), w (B, T, n_I) -> (B, T, S)."""
    ct = torch.promote_types(q.dtype, torch.float32)
    qk = torch.einsum("bthd,bsd->bths", q.to(ct), k.to(ct)).relu()
    return torch.einsum("bths,bth->bts", qk, w.to(ct))


def topk_select(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k entry indices per query, K = min(k, S); picks that are not visible become -1 (docs §2.4).

    scores (B, T, S); visible (T, S) or (B, T, S) bool -> (B, T, K) int64.
    """
    S = scores.shape[-1]
    K = min(k, S)
    visible = visible.expand_as(scores)
    idx = scores.masked_fill(~visible, float("-inf")).topk(K, dim=-1).indices
    ok = torch.gather(visible, -1, idx)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def selection_mask(idx: torch.Tensor, S: int) -> torch.Tensor:
    """(B, T, K) indices with -1 = none -> (B, T, S) bool mask of the selected entries."""
    mask = torch.zeros(*idx.shape[:-1], S + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx < 0, torch.full_like(idx, S), idx), True)
    return mask[..., :S]


class Indexer(nn.Module):
    """Weights of the lightning indexer (REF names: wq_b, weights_proj, compressor.{wkv, wgate, ape, norm})."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        nI, cI = cfg.index_n_heads, cfg.index_head_dim
        self.n_heads, self.head_dim = nI, cI
        latent = cfg.q_lora_rank if cfg.q_lora_rank > 0 else cfg.d_model     # u when there is no c^Q (see above)
        self.wq_b = Linear(latent, nI * cI, "fp8" if cfg.quant != "none" else None)
        self.weights_proj = Linear(cfg.d_model, nI)                           # bf16 in REF, never QAT'd (docs §8.2)
        self.compressor = Compressor(cfg.d_model, cI, cfg.csa_ratio, cfg.compressor_overlap, cfg.norm_eps)
        self.weight_scale = cI ** -0.5 * nI ** -0.5

    def _rotate_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.index_hadamard:
            x = hadamard_rotate(x)
        if self.cfg.quant == "fp4":                                           # MXFP4 q / k after Hadamard (docs §8.2)
            from ..quant import fake_quant_mxfp4
            x = fake_quant_mxfp4(x)
        return x

    def keys(self, u: torch.Tensor, rope) -> torch.Tensor:
        """u (B, T, d) -> K^I (B, floor(T/m), c_I)."""
        return self._rotate_quant(self.compressor(u, rope))

    def queries(self, latent: torch.Tensor, pos: torch.Tensor, rope) -> torch.Tensor:
        """latent (B, T, d_c) (c^Q, or u without a low-rank query) -> q^I (B, T, n_I, c_I)."""
        q = self.wq_b(latent).unflatten(-1, (self.n_heads, self.head_dim))
        return self._rotate_quant(rope(q, pos))

    def head_weights(self, u: torch.Tensor) -> torch.Tensor:
        """w (B, T, n_I) = weights_proj(u) c_I^-1/2 n_I^-1/2."""
        return self.weights_proj(u) * self.weight_scale

    def forward(self, u: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor, rope) -> torch.Tensor:
        """Raw scores I (B, T, S) (invisible entries NOT masked; topk_select masks them)."""
        return index_scores(self.queries(latent, pos, rope), self.keys(u, rope), self.head_weights(u))


def oracle_scores(p_compressed: torch.Tensor) -> torch.Tensor:
    """Oracle selector: the main attention probabilities (B, H, T, S) of the compressed entries, attended densely
    over all visible entries, summed over heads -> (B, T, S)."""
    return p_compressed.sum(1)


def random_scores(B: int, T: int, S: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(B, T, S, device=device, generator=generator)


__all__ = ["visible_entries", "index_scores", "topk_select", "selection_mask", "Indexer", "oracle_scores",
           "random_scores"]
