"""Autoregressive generation with the KV cache: greedy / temperature + top-k sampling, and MTP self-speculative
decoding (speculative.py) when the model has an MTP module (docs §9).

    out = generate(model, prompt_ids, max_new_tokens=32)                    # greedy, (B, P + 32)
    out = generate(model, prompt_ids, 32, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt_ids, 32, wal="gen.wal")     # preemptible: a rerun after a kill resumes (wal.py)
"""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None, storage: str = "fp32",
             prefill_chunk: int | None = None, generator: torch.Generator | None = None,
             return_stats: bool = False, wal=None):
    """prompt_ids (B, P) -> (B, P + max_new_tokens) ids (after eos_id a row keeps emitting eos_id).

    The prompt is prefilled in chunks of `prefill_chunk` tokens (None = one chunk), then one token per step.
    return_stats=True also returns {"prefill_s", "decode_s", "tokens_per_s"}.
    wal=path: write-ahead log of every sampled step (fsync'd before the token is kept); a rerun with the same path
    replays the logged steps and continues with exactly the tokens of an uninterrupted run (wal.py, docs §6.6)."""
    import time
    was_training = model.training
    model.eval()
    B, P = prompt_ids.shape
    log = None
    if wal is not None:                             # restores the sampler's RNG state when resuming (wal.py)
        from .wal import open_wal, sampler_generator
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos_id,
                        storage=storage, prefill_chunk=prefill_chunk)
        log = open_wal(wal, model, prompt_ids, settings, generator)
        gen = sampler_generator(generator, prompt_ids.device) if temperature > 0 else None
    cache = model.new_cache(B, P + max_new_tokens, storage=storage)
    t0 = time.perf_counter()
    step = prefill_chunk or P
    for s in range(0, P, step):
        out = model(prompt_ids[:, s:s + step], cache=cache, last_only=True)
    t1 = time.perf_counter()
    ids, done = prompt_ids, torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    for i in range(max_new_tokens):
        if log is not None and i < log.n_logged:    # resume: the logged step, fed exactly as the first run fed it
            nxt = log.tokens[i].to(ids.device)
        else:
            nxt = sample(out.logits[:, -1], temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            if log is not None:
                log.append(i, nxt, gen)             # durable before the token joins the output
        if eos_id is not None:
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        if i + 1 < max_new_tokens:
            out = model(nxt[:, None], cache=cache, last_only=True)
    t2 = time.perf_counter()
    if log is not None:
        log.close()
    model.train(was_training)
    if return_stats:
        return ids, {"prefill_s": t1 - t0, "decode_s": t2 - t1,
                     "tokens_per_s": B * max_new_tokens / max(t2 - t1, 1e-9)}
    return ids
