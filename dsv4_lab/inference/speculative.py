"""MTP self-speculative greedy decoding (docs §9): the depth-1 MTP module drafts token p+2 while the main model
emits token p+1; one cached forward of both tokens verifies the draft.

    ids, stats = speculative_generate(model, prompt_ids, max_new_tokens=32)
    stats["acceptance_rate"]     # accepted drafts / drafts

Per step, with t_{p+1} the main model's greedy token after position p:
  1. draft   d = argmax MTP(h_{<=p}, Emb(t_{<=p+1}))[p]   -- the MTP block (SWA attention) is recomputed over the last
             `window` positions, which is exactly what its sliding window sees (it keeps no cache of its own)
  2. verify  feed [t_{p+1}, d] through the main model with the KV cache -> greedy g at p+1 (and the token after d)
  3. accept  if g == d for every row (the batch moves in lockstep): two tokens for one main forward
     reject  restore the state cache (window rings, compressor tails, length) from a snapshot taken before step 2
             and feed t_{p+1} alone. Block-cache entries need no rollback: reads never go past cache.length and the
             redo rewrites them.
The output is the same token sequence as plain greedy decoding (up to fp32 ties; tested).
"""
from __future__ import annotations

import time

import torch


def _snapshot(cache) -> dict:
    snap = {"length": cache.length, "rings": [], "states": []}
    for lc in cache.layers:
        snap["rings"].append({k: v.clone() for k, v in lc.main.t.items()} if lc.window is not None else None)
        snap["states"].append({n: (s.kv.clone(), s.score.clone()) for n, s in lc.states.items()})
    return snap


def _restore(cache, snap: dict) -> None:
    cache.length = snap["length"]
    for lc, ring, states in zip(cache.layers, snap["rings"], snap["states"]):
        if ring is not None:
            for k, v in ring.items():
                lc.main.t[k].copy_(v)
        for n, (kv, score) in states.items():
            lc.states[n].kv.copy_(kv)
            lc.states[n].score.copy_(score)


def _draft(model, hist_h: torch.Tensor, hist_tok: torch.Tensor) -> torch.Tensor:
    """Depth-1 MTP over the recent window: hist_h (B, W, [n,] d) main states at positions i, hist_tok (B, W) the
    tokens t_{i+1}; returns the greedy draft of t_{p+2} (B,)."""
    layer = model.mtp.layers[0]
    h = layer(hist_h, model.embed(hist_tok), hist_tok)
    return model.hidden_to_logits(h[:, -1:], layer.hc_head, layer.norm)[:, -1].argmax(-1)


@torch.no_grad()
def speculative_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, storage: str = "fp32",
                         drafter=None):
    """Greedy decoding with MTP drafts. Returns (ids (B, P + max_new_tokens), stats).

    drafter(model, hist_h, hist_tok, n_emitted) -> (B,) overrides the MTP draft (e.g. an oracle, in tests)."""
    if drafter is None and model.mtp is None:
        raise ValueError("speculative_generate needs a model with mtp_depth >= 1 (got mtp_depth=0)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed: a positive integer")
    was = model.training
    model.eval()
    B, P = prompt_ids.shape
    W = model.cfg.window
    cache = model.new_cache(B, P + max_new_tokens + 1, storage=storage)
    t0 = time.perf_counter()
    out = model(prompt_ids, cache=cache)
    nxt = out.logits[:, -1].argmax(-1)                                   # t_P
    hist_h = out.state[:, -W:]
    hist_tok = torch.cat([prompt_ids[:, 1:], nxt[:, None]], 1)[:, -W:]  # t_{i+1} for each kept position i
    new, drafted, accepted, main_calls = [], 0, 0, 1

    def push(h, tok):
        nonlocal hist_h, hist_tok
        hist_h = torch.cat([hist_h, h], 1)[:, -W:]
        hist_tok = torch.cat([hist_tok, tok], 1)[:, -W:]

    while True:
        new.append(nxt)
        if len(new) == max_new_tokens:
            break
        d = _draft(model, hist_h, hist_tok) if drafter is None else drafter(model, hist_h, hist_tok, len(new))
        drafted += 1
        snap = _snapshot(cache)
        out2 = model(torch.stack([nxt, d], 1), cache=cache)
        main_calls += 1
        g = out2.logits[:, 0].argmax(-1)
        if bool((g == d).all()):
            accepted += 1
            new.append(d)
            after = out2.logits[:, 1].argmax(-1)
            push(out2.state, torch.stack([d, after], 1))
            if len(new) == max_new_tokens:
                break
            nxt = after
        else:
            _restore(cache, snap)
            out1 = model(nxt[:, None], cache=cache)
            main_calls += 1
            g = out1.logits[:, -1].argmax(-1)
            push(out1.state, g[:, None])
            nxt = g
    model.train(was)
    ids = torch.cat([prompt_ids, torch.stack(new, 1)], 1)
    stats = {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / max(drafted, 1),
             "main_forward_calls": main_calls, "tokens_per_main_call": max_new_tokens / max(main_calls - 1, 1),
             "seconds": time.perf_counter() - t0}
    return ids, stats
