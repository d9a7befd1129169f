"""Training the lightning indexer: the V3.2 KL recipe (docs §10; UNCONFIRMED for V4, App. D.5) and its recall.

    p_{t,:}  = main attention probabilities over the compressed entries the query attended, summed over heads,
               L1-normalised over those entries, detached (the target)
    L_I      = mean_t KL(p_{t,:} || softmax(I_{t,:}))        softmax over the same entries

Choice: a mean over query rows that attended at least one compressed entry (V3.2 writes a sum over t); the weight
`indexer_loss_weight` then does not depend on the sequence length.

Stages (set_indexer_stage, called by the training loop):
  * "warmup": every parameter outside the indexers is frozen; CSA attends to all visible compressed entries
    (dense, HCA-like) and the KL runs over all visible entries.
  * "sparse": parameters unfrozen (their previous requires_grad restored); CSA attends to its top-k and the KL runs
    over the selected set. The indexer reads detached inputs, so the KL never trains the model and, the selection
    being non-differentiable, the LM loss never trains the indexer.

Recall (docs/methodology.md §3.10): fraction of the oracle's top-k (top-k of the dense attention probabilities over all visible
entries) that a selector also picks, counted over queries with more visible entries than k (otherwise every
selector picks everything).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.sparse_kl.naive import masked_kl

STAGES = ("warmup", "sparse")


def indexer_kl_loss(scores: torch.Tensor, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss written over dense tensors: scores I (B, T, S) (differentiable), p (B, H, T, S) attention
    probabilities, mask (B, T, S) attended entries. Returns mean over rows with >= 1 attended entry of
    KL(p_norm || softmax_mask(I)); 0 if no such row. The model computes the same quantity from its picks and the
    attention's lse without any (B, T, S) tensor (kernels.sparse_kl, called by Attention.forward)."""
    ct = torch.promote_types(scores.dtype, torch.float32)
    kl_sum, n_rows = masked_kl(scores.to(ct), p.detach().to(ct).sum(1), mask)
    return kl_sum / n_rows.clamp_min(1)


def _csa_layers(model: nn.Module):
    from .csa import CSAttention
    return [m for m in model.modules() if isinstance(m, CSAttention)]


def set_indexer_stage(model: nn.Module, stage: str) -> None:
    """Switch every CSA layer of `model` to the "warmup" or "sparse" indexer stage (docs §10)."""
    if stage not in STAGES:
        raise ValueError(f"indexer stage = {stage!r} is not allowed: one of {STAGES}")
    layers = _csa_layers(model)
    indexer_params = {id(p) for layer in layers for p in layer.indexer.parameters()}
    saved = getattr(model, "_indexer_saved_requires_grad", None)
    if stage == "warmup":
        if saved is None:
            model._indexer_saved_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in indexer_params)
    else:
        if saved is not None:
            for n, p in model.named_parameters():
                p.requires_grad_(saved.get(n, True))
            del model._indexer_saved_requires_grad
    for layer in layers:
        layer.indexer_stage = stage


@torch.no_grad()
def indexer_recall(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Recall of the learned and the random selector against the oracle, per CSA layer and overall.

    Runs one forward pass (eval mode, restored afterwards). Returns {"layers": {layer_idx: {"learned": r,
    "random": r, "rows": n}}, "learned": r, "random": r} with r = |picked & oracle| / |oracle| over queries whose
    number of visible entries exceeds index_topk (nan when there is none).
    """
    layers = _csa_layers(model)
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.probe = True
    try:
        model(input_ids)
    finally:
        for layer in layers:
            layer.probe = False
        model.train(was_training)
    out, tot = {"layers": {}}, {"learned": [0, 0], "random": [0, 0]}
    for layer in layers:
        po, layer.probe_out = layer.probe_out, None
        k = layer.cfg.index_topk
        rows = po["visible"].sum(-1) > k                                          # (T,)
        res = {"rows": int(rows.sum()) * po["oracle"].shape[0]}
        orc = po["oracle"][:, rows]                                               # (B, R, K)
        for name in ("learned", "random"):
            sel = po[name][:, rows]
            hit = ((sel[..., :, None] == orc[..., None, :]) & (orc[..., None, :] >= 0)).any(-2).sum()
            n = (orc >= 0).sum()
            res[name] = (hit / n).item() if n else float("nan")
            tot[name][0] += int(hit)
            tot[name][1] += int(n)
        out["layers"][layer.layer_idx] = res
    for name, (h, n) in tot.items():
        out[name] = h / n if n else float("nan")
    return out
