"""DSV4LM: the whole model, every component a toggle of ModelConfig (docs §1.1).

    ids (B, T) -> embedding (B, T, d) -> residual state X ((B, T, d) plain, (B, T, n_hc, d) hc/mhc)
      -> L x Block: [attn site: X -> pre -> attn_norm -> Attention -> post]  [ffn site: ... -> FFN / MoE -> post]
      -> hc_head collapse (hc/mhc) -> final RMSNorm -> head -> logits (B, T, V)
    (+ MTP depth D on the final state, docs §9)

With every toggle off (layer_types all "dense", residual="plain", ffn="dense", mtp_depth=0) this is a plain
pre-norm decoder with MQA attention and SwiGLU: the dense baseline arm.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import Block
from .config import ModelConfig
from .layers import Linear, RMSNorm
from .mtp import MTP
from .residual import build_head_collapse, expand_streams


@dataclass
class LMOutput:
    logits: torch.Tensor                      # (B, T, V)
    loss: torch.Tensor | None = None          # total training loss: lm_loss + weighted auxiliary losses
    lm_loss: torch.Tensor | None = None       # next-token cross-entropy of the main head
    aux: dict = field(default_factory=dict)   # auxiliary losses ("*_loss", already weighted) and metrics
    state: torch.Tensor | None = None         # final residual state before the head collapse (for MTP)


class DSV4LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.hc_head = build_head_collapse(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, impl=cfg.kernels)
        self.head = Linear(cfg.d_model, cfg.vocab_size)            # not tied to the embedding (docs §1.1)
        self.mtp = None
        if cfg.mtp_depth > 0:
            self.mtp = MTP(cfg)
        self.apply(self._init_weights)
        for m in self.modules():                                   # mechanism-specific inits (mHC, sinks, ...)
            if m is not self and hasattr(m, "reset_parameters_v4"):
                m.reset_parameters_v4()

    def _init_weights(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)

    def new_cache(self, batch_size: int, max_len: int, storage: str = "fp32", device=None):
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (docs §6, inference/cache.py);
        then `model(ids_chunk, cache=cache)` prefills / decodes. storage: fp32 | bf16 | paper (FP8 + BF16 + FP4)."""
        from .inference.cache import KVCache
        return KVCache(self, batch_size, max_len, storage, device)

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - (self.embed.weight.numel() if exclude_embedding else 0)

    def hidden_to_logits(self, state: torch.Tensor, hc_head: nn.Module | None = None,
                         norm: nn.Module | None = None) -> torch.Tensor:
        hc_head = self.hc_head if hc_head is None else hc_head
        z = hc_head(state) if hc_head is not None else state      # (B, T, d)
        return self.head((norm or self.norm)(z)).float()

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache=None,
                last_only: bool = False) -> LMOutput:
        """input_ids (B, T) int64; targets (B, T) with -100 = ignore. Returns LMOutput.

        With `cache` (new_cache; docs §6) the chunk sits at positions cache.length .. cache.length+T-1: every block
        runs its ordinary forward, each attention layer reading and updating its part of the cache, then the cache
        advances by T. last_only: logits of the last position only (generation)."""
        B, T = input_ids.shape
        if cache is not None:
            if B != cache.B:
                raise ValueError(f"batch size {B} does not match the cache's batch_size={cache.B}")
            if cache.length + T > cache.max_len:
                raise ValueError(f"chunk of {T} tokens at position {cache.length} exceeds the cache's "
                                 f"max_len={cache.max_len}")
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = expand_streams(self.cfg, self.embed(input_ids))
        for blk in self.blocks:
            x = blk(x, input_ids, cache)
        if cache is not None:
            cache.advance(input_ids)                               # ids kept, length += T
        logits = self.hidden_to_logits(x[:, -1:] if last_only else x)
        out = LMOutput(logits=logits, state=x)
        if self.mtp is not None and targets is not None:
            self.mtp(self, x, input_ids, targets)                  # records its loss in self.mtp._aux
        out.aux = self.collect_aux()
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            out.loss = out.lm_loss + sum((v for k, v in out.aux.items() if k.endswith("_loss")),
                                         torch.zeros((), device=logits.device))
        return out

    def collect_aux(self) -> dict:
        """Gather and clear what sub-modules recorded in `_aux` during forward (losses end in `_loss`)."""
        aux: dict = {}
        for name, m in self.named_modules():
            d = getattr(m, "_aux", None)
            if d:
                for k, v in d.items():
                    key = k if k.endswith("_loss") else f"{name}.{k}"
                    aux[key] = aux[key] + v if key in aux and k.endswith("_loss") else v
                m._aux = {}
        return aux
