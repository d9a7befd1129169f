"""Multi-token prediction (docs §9; V3 report, V4 "without modification"; REF `MTPBlock`).

Depth k = 1..D (D = mtp_depth, 0 = off), token alignment per V3 (App. D.9):

    h^0 = the main model's final residual state X (B, T, [n_hc,] d), before hc_head
    position i at depth k combines h^{k-1}_i with the embedding of token t_{i+k} and predicts t_{i+k+1}:
        x_i = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h^{k-1}_i))     per stream j for hc/mhc (docs §9)
        h^k = Block_k(x)           one full block: attention SWA-only (rope_theta, no YaRN), FFN as the main model
                                   (MoE score-routed: its layer index is L + k - 1 >= n_hash_layers)
        logits^k_i = head(norm_k(hc_head_k(h^k_i)))           own hc_head and final norm, SHARED embedding and head
    valid positions i = 0 .. T-k-1;  with the main targets y_i = t_{i+1}:  the target of logits^k_i is y_{i+k}
    L_MTP = (lambda / D) * sum_k CE^k,  lambda = loss_weight (mtp_loss_weight, then mtp_loss_weight_decay from the
    start of the LR decay: the training loop calls `set_loss_weight`)

Recorded: _aux["mtp_loss"] (weighted, added to the training loss by DSV4LM) and metrics "ce_k" (unweighted CE).
`acceptance_rate(model, ids)` measures depth-1 self-speculative greedy acceptance (see its docstring).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import Block
from .config import ModelConfig
from .layers import Linear, RMSNorm
from .residual import build_head_collapse


class MTPBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        d = cfg.d_model
        layer_idx = cfg.n_layers + depth - 1
        # the block sees a config whose schedule has one more, SWA-only, entry (docs §4 compress_ratios[L] = 0)
        bcfg = cfg.replace(layer_types=list(cfg.layer_types) + ["swa"] * depth, mtp_depth=0)
        self.enorm, self.hnorm = (RMSNorm(d, cfg.norm_eps, impl=cfg.kernels) for _ in range(2))
        q8 = "fp8" if cfg.quant != "none" else None
        self.e_proj, self.h_proj = Linear(d, d, q8), Linear(d, d, q8)
        self.block = Block(bcfg, layer_idx)
        self.hc_head = build_head_collapse(cfg)                    # own copy (None for plain)
        self.norm = RMSNorm(d, cfg.norm_eps, impl=cfg.kernels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """h (B, T', [n,] d) previous-depth state, emb (B, T', d) embeddings of the shifted tokens -> new state."""
        return self.block(self.mix(h, emb), input_ids)

    def mix(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The block's input: h_proj(hnorm(h)) + e_proj(enorm(emb)), e added to every stream (B, T', [n,] d)."""
        e = self.e_proj(self.enorm(emb))
        return self.h_proj(self.hnorm(h)) + (e.unsqueeze(2) if h.dim() == 4 else e)


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MTPBlock(cfg, k + 1) for k in range(cfg.mtp_depth))
        self.loss_weight = cfg.mtp_loss_weight
        self._aux: dict = {}

    def set_loss_weight(self, w: float) -> None:
        """lambda: 0.3 for most of training, mtp_loss_weight_decay (0.1) from the start of the LR decay (docs §4)."""
        if w < 0:
            raise ValueError(f"MTP loss weight = {w!r} is not allowed: a number >= 0")
        self.loss_weight = float(w)

    def predict(self, model: nn.Module, state: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """[logits^k (B, T-k, V) for k = 1..D]; logits^k[:, i] predicts token i+k+1."""
        out, h = [], state
        T = input_ids.shape[1]
        for k, layer in enumerate(self.layers, start=1):
            if T - k <= 0:
                break
            ids_k = input_ids[:, k:]                                   # t_{i+k}
            h = layer(h[:, : T - k], model.embed(ids_k), ids_k)
            out.append(model.hidden_to_logits(h, layer.hc_head, layer.norm))
        return out

    def forward(self, model: nn.Module, state: torch.Tensor, input_ids: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        logits = self.predict(model, state, input_ids)
        ces = []
        for k, lg in enumerate(logits, start=1):
            ce = F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100)   # y_{i+k}
            ces.append(ce)
            self._aux[f"ce_{k}"] = ce.detach()
        loss = torch.stack(ces).sum() / len(self.layers) * self.loss_weight if ces else state.new_zeros(())
        self._aux["mtp_loss"] = loss
        return loss


@torch.no_grad()
def acceptance_rate(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Depth-1 self-speculative greedy acceptance on a given sequence (teacher-forced): the draft for token i+2 is
    argmax logits^1_i (MTP, given the true t_{i+1}); the main model verifies it with argmax of its own logits at
    position i+1. Returns the fraction of positions where they agree = the acceptance rate of greedy speculative
    decoding when the sequence is the model's own greedy continuation."""
    if model.mtp is None:
        raise ValueError("acceptance_rate needs a model with mtp_depth >= 1")
    was = model.training
    model.eval()
    out = model(input_ids)
    draft = model.mtp.predict(model, out.state, input_ids)[0].argmax(-1)          # (B, T-1): token i+2
    main = out.logits[:, 1:].argmax(-1)                                            # (B, T-1): token i+2
    model.collect_aux()
    model.train(was)
    return (draft == main).float().mean().item()
