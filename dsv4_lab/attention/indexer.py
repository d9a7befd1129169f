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
The score formula, visibility and the top-k live once, in kernels/indexer_topk/naive.py (the kernel's naive twin);
the functions below name them for the model, notebooks and tests. With a KV cache, `keys` streams the chunk through
the indexer compressor's state and reads every key so far back from the block cache (docs §6.2).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..layers import Linear
from ..kernels.indexer_topk import MXFP4Keys, index_scores, topk_indices, visible
from ..quant import fake_quant_mxfp4
from .compressor import Compressor
from .hadamard import hadamard_rotate


def visible_entries(pos: torch.Tensor, S: int, m: int) -> torch.Tensor:
    """(T, S) bool: compressed entry s is visible to the query at position t iff s < floor((t+1)/m) (docs §2.4)."""
    return visible(pos, S, m)


def topk_select(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k entry indices per query, K = min(k, S); picks that are not visible become -1 (docs §2.4).

    scores (B, T, S); visible (T, S) or (B, T, S) bool -> (B, T, K) int32 (kernels.indexer_topk's contract)."""
    return topk_indices(scores.masked_fill(~visible, float("-inf")), min(k, scores.shape[-1]))


def selection_mask(idx: torch.Tensor, S: int) -> torch.Tensor:
    """(B, T, K) indices with -1 = none -> (B, T, S) bool mask of the selected entries."""
    idx = idx.long()
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
        self.compressor = Compressor(cfg.d_model, cI, cfg.csa_ratio, cfg.compressor_overlap, cfg.norm_eps,
                                     impl=cfg.kernels)
        self.weight_scale = cI ** -0.5 * nI ** -0.5

    def _rotate_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.index_hadamard:
            x = hadamard_rotate(x)
        if self.cfg.quant == "fp4":                                           # MXFP4 q / k after Hadamard (docs §8.2)
            x = fake_quant_mxfp4(x)
        return x

    def keys(self, u: torch.Tensor, rope, lc=None, p0: int = 0, packed: bool = False):
        """u (B, T, d) -> K^I (B, floor(T/m), c_I). With a cache (docs §6.2): the chunk at p0.. streams through the
        indexer compressor's state, new keys go to the block cache, and all floor((p0 + T)/m) keys are read back;
        packed=True: as MXFP4Keys where the cache stores them packed (storage "paper", docs §6.3)."""
        if lc is None:
            return self._rotate_quant(self.compressor(u, rope))
        normed, first = self.compressor.step(u, lc.states["index"], p0)
        new = self.compressor.rotate(normed, rope, first)
        new = self._rotate_quant(new) if new.shape[1] else new
        return lc.append_entries("index", new, first, (p0 + u.shape[1]) // self.compressor.m, packed=packed)

    def queries(self, latent: torch.Tensor, pos: torch.Tensor, rope) -> torch.Tensor:
        """latent (B, T, d_c) (c^Q, or u without a low-rank query) -> q^I (B, T, n_I, c_I)."""
        q = self.wq_b(latent).unflatten(-1, (self.n_heads, self.head_dim))
        return self._rotate_quant(rope(q, pos))

    def head_weights(self, u: torch.Tensor) -> torch.Tensor:
        """w (B, T, n_I) = weights_proj(u) c_I^-1/2 n_I^-1/2."""
        return self.weights_proj(u) * self.weight_scale

    def project(self, u: torch.Tensor, latent: torch.Tensor, p0: int, rope, lc=None, packed: bool = False):
        """(qI (B, T, n_I, c_I), kI (B, S, c_I), w (B, T, n_I)) for the chunk at positions p0.. (cache: see keys).
        The keys come out of the compressor in fp32; they are cast to the queries' dtype (bf16 under autocast; V4
        keeps its indexer QK path in low precision, MXFP4, docs §6.3 and §8; a no-op in fp32), so the selection and
        the indexer KL score the same keys with bf16 dots. packed=True (the selection alone, no gradient): kI may
        come as the cache's MXFP4Keys, which the top-k unpacks to the same values."""
        pos = torch.arange(p0, p0 + u.shape[1], device=u.device)
        qI = self.queries(latent, pos, rope)
        kI = self.keys(u, rope, lc, p0, packed)
        return qI, kI if isinstance(kI, MXFP4Keys) else kI.to(qI.dtype), self.head_weights(u)

    def forward(self, u: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor, rope) -> torch.Tensor:
        """Raw scores I (B, T, S) (invisible entries NOT masked; topk_select masks them)."""
        return index_scores(self.queries(latent, pos, rope), self.keys(u, rope), self.head_weights(u))


def random_scores(B: int, p0: int, T: int, S: int, seed: int, device) -> torch.Tensor:
    """The "random" selector's scores (B, T, S) in [0, 1): a fixed integer hash of (seed, row b, position t, entry s),
    so every query picks a uniformly random-looking subset of its visible entries and a cached decode draws exactly
    what the full forward draws. seed = the layer index (layers pick differently)."""
    b = torch.arange(B, device=device)[:, None, None]
    t = torch.arange(p0, p0 + T, device=device)[None, :, None]
    s = torch.arange(S, device=device)[None, None, :]
    x = _hash32(_hash32(_hash32(torch.full((), seed, device=device) + 0x9E37) ^ b) ^ t) ^ s
    return _hash32(x).double() / 2.0 ** 32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors (values < 2^32, products < 2^59: no overflow)."""
    M = 0xFFFFFFFF
    x = x & M
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M
    return (x >> 16) ^ x


__all__ = ["visible_entries", "index_scores", "topk_select", "selection_mask", "Indexer", "random_scores"]
