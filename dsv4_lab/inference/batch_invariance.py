"""Batch-invariant decode and deterministic training (docs §6.5): a sequence decoded alone, or at any position of a
batch of other sequences of other lengths, gives bitwise the same logits and tokens; two identical training runs
with deterministic=true give bitwise the same losses (`set_deterministic`, called by train.py).

    toks, logits = decode_batch(model, [p0, p1, p2], max_new_tokens=16)                   # batch_invariant=True
    toks, logits = decode_batch(model, [p0, p1, p2], 16, batch_invariant=False)            # one batched GEMM / op
    rows = check_batch_invariance(model)            # alone vs in batches, both modes: bitwise equal? max |diff|?
    rows = decode_cost(model, batch_sizes=(1, 4, 8))                # ms per generated token, both modes

What breaks bitwise equality when sequences share a batch (measured on CPU, docs §6.5):
  * GEMMs over the batch: a (M, k) x (k, n) product's rounding depends on M (BLAS takes a matrix-vector kernel at
    M = 1 and blocked GEMM kernels with other K-blocking for M > 1), so every linear layer, the MoE experts' grouped
    GEMMs (their M = tokens routed to that expert, which depends on the other sequences) and the head change in the
    last bits with the batch size, though no row ever reads another row;
  * attention over a padded or same-length batch would mix lengths into masks and reduction lengths; here every
    sequence keeps its own cache (positions, rings, compressor tails), so no padding exists at all;
  * GPU split-KV decode kernels (kernels/*/triton_decode.py) choose the number of splits from B * T, so the
    combine's summation order changes with the batch unless num_splits is fixed.
batch_invariant=True runs every computation of a sequence with the shapes it has alone (one (1, 1) step per sequence
and per decode step through the model; its own single-sequence cache), so the arithmetic is the alone run's, op for
op: invariance by construction, at the price of B small GEMMs instead of one. batch_invariant=False (the fast path)
runs the token-wise parts (embedding, mHC, norms, FFN / MoE, head) as one (B, 1) batch and attention per sequence
against its own cache (a `RaggedCache`: variable lengths without padding); it matches the alone run to fp32
rounding, not bitwise.
"""
from __future__ import annotations

import os
import time

import torch

from ..residual import expand_streams


class RaggedCache:
    """B single-sequence KVCaches decoded together, each at its own length (no padding). An attention layer
    (attention/attention.py) hands a ragged cache the whole chunk and gets back the concatenated per-sequence outputs
    of its own forward, run with each sequence's cache."""

    ragged = True

    def __init__(self, caches: list):
        self.caches = caches
        self.B = len(caches)

    def attend(self, attn, u: torch.Tensor) -> torch.Tensor:
        """u (B, T, d) -> (B, T, d): sequence b's rows through layer attn with caches[b] (its own positions)."""
        return torch.cat([attn(u[b:b + 1], None, c) for b, c in enumerate(self.caches)], 0)


def ragged_step(model, ids: torch.Tensor, rc: RaggedCache) -> torch.Tensor:
    """One decode step of B sequences of different lengths: ids (B, 1) -> last logits (B, V); advances every cache.
    Same path as DSV4LM.forward with a cache, with the token-wise parts batched and attention per sequence."""
    B, T = ids.shape
    for c in rc.caches:
        if c.length + T > c.max_len:
            raise ValueError(f"step at position {c.length} exceeds the cache's max_len={c.max_len}")
    x = expand_streams(model.cfg, model.embed(ids))
    for blk in model.blocks:
        x = blk(x, ids, cache=rc)
    for b, c in enumerate(rc.caches):
        c.advance(ids[b:b + 1])                                           # ids kept, length += T
    logits = model.hidden_to_logits(x[:, -1:])[:, -1]
    model.collect_aux()                                                   # clear what modules recorded
    return logits


@torch.no_grad()
def decode_batch(model, prompts: list[torch.Tensor], max_new_tokens: int, batch_invariant: bool = True,
                 storage: str = "fp32", return_stats: bool = False):
    """Greedy decoding of sequences of different lengths together. prompts: list of (P_b,) long tensors.

    Returns (tokens (B, max_new_tokens) long, logits (B, max_new_tokens, V) fp32: the logits each token was picked
    from). Every prompt is prefilled alone (its own cache); then per step either one (1, 1) model step per sequence
    (batch_invariant=True) or one ragged (B, 1) step (batch_invariant=False). return_stats=True also returns
    {"prefill_s", "decode_s", "decode_steps"} (decode_s: the max_new_tokens - 1 steps after the prefill)."""
    if not prompts or max_new_tokens < 1:
        raise ValueError(f"need >= 1 prompt and max_new_tokens >= 1 (got {len(prompts)} prompts, "
                         f"max_new_tokens={max_new_tokens})")
    was = model.training
    model.eval()
    dev = prompts[0].device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    caches, last = [], []
    for p in prompts:
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"each prompt must be a non-empty 1-D tensor of ids (got shape {tuple(p.shape)})")
        c = model.new_cache(1, p.numel() + max_new_tokens, storage=storage)
        last.append(model(p[None], cache=c, last_only=True).logits[:, -1])          # (1, V)
        caches.append(c)
    logits = torch.cat(last, 0)                                                       # (B, V)
    rc = RaggedCache(caches)
    sync()
    t1 = time.perf_counter()
    toks, outs = [], []
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1)                                                       # (B,)
        toks.append(nxt)
        outs.append(logits)
        if i + 1 == max_new_tokens:
            break
        if batch_invariant:
            logits = torch.cat([model(nxt[b].view(1, 1), cache=c, last_only=True).logits[:, -1]
                                for b, c in enumerate(caches)], 0)
        else:
            logits = ragged_step(model, nxt[:, None], rc)
    sync()
    t2 = time.perf_counter()
    model.train(was)
    if return_stats:
        return torch.stack(toks, 1), torch.stack(outs, 1), {"prefill_s": t1 - t0, "decode_s": t2 - t1,
                                                            "decode_steps": max_new_tokens - 1}
    return torch.stack(toks, 1), torch.stack(outs, 1)


# ---------------------------------------------------------------------------------------------------------------
# The check and the cost (notebook 10, tests/test_batch_invariance.py)
# ---------------------------------------------------------------------------------------------------------------

def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0, device=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).to(device) for n in lengths]


def check_batch_invariance(model, target_len: int = 11, other_lengths=(3, 17, 6, 25, 9, 14, 4, 20),
                           placements=((2, 1), (4, 0), (9, 4), (9, 8)), max_new_tokens: int = 8,
                           modes=(True, False), seed: int = 0) -> list[dict]:
    """Decode a target prompt alone, then inside batches of other prompts of other lengths, in both modes.

    placements: (batch size, position of the target); the other members are the first B - 1 of `other_lengths`
    (up to 8 others). One row per (mode, placement): {"batch_invariant", "batch_size", "position",
    "logits_bitwise" (torch.equal), "tokens_equal", "max_abs_diff", "n_logits"}. Notebook use:
        import pandas as pd; pd.DataFrame(check_batch_invariance(model))"""
    dev = next(model.parameters()).device
    V = model.cfg.vocab_size
    target = random_prompts(V, [target_len], seed, dev)[0]
    others = random_prompts(V, list(other_lengths), seed + 1, dev)
    rows = []
    for inv in modes:
        alone_t, alone_l = decode_batch(model, [target], max_new_tokens, batch_invariant=inv)
        for B, pos in placements:
            if not 0 <= pos < B <= len(others) + 1:
                raise ValueError(f"placement (batch_size={B}, position={pos}) is not allowed: "
                                 f"0 <= position < batch_size <= {len(others) + 1}")
            batch = others[:B - 1]
            batch = batch[:pos] + [target] + batch[pos:]
            t, lg = decode_batch(model, batch, max_new_tokens, batch_invariant=inv)
            rows.append({"batch_invariant": inv, "batch_size": B, "position": pos,
                         "logits_bitwise": bool(torch.equal(lg[pos], alone_l[0])),
                         "tokens_equal": bool(torch.equal(t[pos], alone_t[0])),
                         "max_abs_diff": float((lg[pos] - alone_l[0]).abs().max()),
                         "n_logits": lg[pos].numel()})
    return rows


def decode_cost(model, batch_sizes=(1, 4, 8), prompt_lengths=(12, 5, 20, 9, 16, 7, 13, 3), max_new_tokens: int = 16,
                repeats: int = 3, seed: int = 0) -> list[dict]:
    """ms per generated token (decode steps only, prefill excluded) of both modes: one row per (mode, batch size)
    {"batch_invariant", "batch_size", "ms_per_token", "ms_per_step"}; the best of `repeats` runs."""
    dev = next(model.parameters()).device
    rows = []
    for B in batch_sizes:
        prompts = random_prompts(model.cfg.vocab_size, [prompt_lengths[b % len(prompt_lengths)] for b in range(B)],
                                 seed, dev)
        for inv in (True, False):
            best = min(decode_batch(model, prompts, max_new_tokens + 1, batch_invariant=inv, return_stats=True)[2]
                       ["decode_s"] for _ in range(repeats))
            steps = max_new_tokens
            rows.append({"batch_invariant": inv, "batch_size": B, "ms_per_step": 1e3 * best / steps,
                         "ms_per_token": 1e3 * best / (steps * B)})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Deterministic execution (TrainConfig.deterministic)
# ---------------------------------------------------------------------------------------------------------------

def set_deterministic(device, kernels: str = "torch", compile: str = "false") -> None:
    """Make this process's runs bitwise repeatable on `device` (train.py calls it when deterministic=true):
    torch.use_deterministic_algorithms(True) (deterministic variants of index_add_ / scatter / index_put; an op that
    has none raises and names itself), cuBLAS with a fixed workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8, read when
    cuBLAS starts, so set before the model's first GEMM), cuDNN deterministic without autotuning.
    On CUDA it also needs kernels=torch (the Triton backward kernels add entry / mHC gradients with fp32 atomics,
    docs/kernels.md §2.2) and compile=false (Inductor's generated kernels are not covered by the GPU test); both cost
    speed. On CPU torch's kernels are already run-to-run deterministic at a fixed thread count."""
    from ..config import ConfigError
    if torch.device(device).type == "cuda":
        for field, value, want in (("kernels", kernels, "torch"), ("compile", compile, "false")):
            if value != want:
                raise ConfigError(f"config field '{field}' = {value!r} is not allowed with deterministic=true on "
                                  f"CUDA: {field}={want} (or deterministic=false)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
