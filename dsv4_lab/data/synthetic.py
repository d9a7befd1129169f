"""Synthetic long-range tasks whose dependency distance is far beyond the attention window (docs/methodology.md §3.5).

Byte vocabulary layout (V = 256): 0 BOS, 1 SEP, 2 QUERY, 3-10 needle types, 11-26 ordinals, 32-127 filler,
128-191 keys, 192-255 values / needle contents.

* Multi-key associative retrieval (`retrieval`): BOS, n key-value pairs, filler, SEP, then n_queries queries
  `k v` asking for earlier pairs. The filler length sets the dependency distance (default: fill the sequence).
  With n_near > 0 the last n_near pairs sit after the filler, just before SEP, so queries about them have a
  short dependency distance (inside a small attention window) and the others a long one.
* MRCR-like multi-needle (`mrcr`): filler text with needles `TYPE c1..cL` of several types inserted at random
  places; several needles share one type. The query `QUERY TYPE ORDINAL` asks for the content of the ORDINAL-th
  needle of that TYPE; the answer is its L content tokens. n_queries such queries follow the haystack, each about a
  different needle (more supervised answers per sequence; one query by default).

Targets are -100 everywhere except at answer tokens, so the loss and the accuracy measure retrieval only.
Every batch is a pure function of (seed, index), so runs are reproducible and resumable.
"""
from __future__ import annotations

import torch

BOS, SEP, QUERY = 0, 1, 2
TYPES = range(3, 11)
ORDINALS = range(11, 27)
FILLER = (32, 128)
KEYS = (128, 192)
VALUES = (192, 256)


def _gen(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def retrieval_batch(batch: int, seq_len: int, n_pairs: int = 8, n_queries: int = 4, distance: int | None = None,
                    seed: int = 0, index: int = 0, n_near: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), each (batch, seq_len). Answer distance >= the filler length, except for queries
    about the n_near pairs placed after the filler (distance <= 2 (n_near + n_queries))."""
    used = 1 + 2 * n_pairs + 1 + 2 * n_queries
    if n_queries > n_pairs or n_pairs > KEYS[1] - KEYS[0]:
        raise ValueError(f"task_n_queries={n_queries} must be <= task_n_pairs={n_pairs} <= {KEYS[1] - KEYS[0]}")
    if not 0 <= n_near <= n_pairs:
        raise ValueError(f"task_n_near={n_near} must be in [0, task_n_pairs={n_pairs}]")
    if seq_len < used + 1:
        raise ValueError(f"seq_len={seq_len} too short for {n_pairs} pairs and {n_queries} queries (need > {used})")
    fill = seq_len + 1 - used if distance is None else min(distance, seq_len + 1 - used)
    g = _gen(seed, index)
    seqs = torch.full((batch, seq_len + 1), FILLER[0], dtype=torch.long)
    tgt = torch.full((batch, seq_len + 1), -100, dtype=torch.long)
    for b in range(batch):
        keys = KEYS[0] + torch.randperm(KEYS[1] - KEYS[0], generator=g)[:n_pairs]
        vals = torch.randint(*VALUES, (n_pairs,), generator=g)
        kv = torch.stack([keys, vals], 1).flatten().tolist()
        far, near = kv[: 2 * (n_pairs - n_near)], kv[2 * (n_pairs - n_near):]
        s = [BOS] + far + torch.randint(*FILLER, (fill,), generator=g).tolist() + near + [SEP]
        pick = torch.randperm(n_pairs, generator=g)[:n_queries]
        ans_pos = []
        for i in pick.tolist():
            s += [int(keys[i])]
            ans_pos.append(len(s))
            s += [int(vals[i])]
        s += torch.randint(*FILLER, (seq_len + 1 - len(s),), generator=g).tolist()
        seqs[b] = torch.tensor(s[: seq_len + 1])
        for p in ans_pos:
            tgt[b, p] = seqs[b, p]
    return seqs[:, :-1].contiguous(), tgt[:, 1:].contiguous()


def mrcr_batch(batch: int, seq_len: int, n_needles: int = 3, n_types: int = 3, needle_len: int = 4,
               seed: int = 0, index: int = 0, n_queries: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), each (batch, seq_len); n_queries queries at the end of each sequence, each about a
    different needle (the first drawn as with n_queries = 1, so one query gives the same batches as before)."""
    total_needles = n_needles * n_types
    used = 1 + total_needles * (1 + needle_len) + n_queries * (3 + needle_len)
    if n_types > len(TYPES) or n_needles > len(ORDINALS):
        raise ValueError(f"at most {len(TYPES)} needle types and {len(ORDINALS)} needles per type")
    if not 1 <= n_queries <= total_needles:
        raise ValueError(f"task_mrcr_queries={n_queries} must be in [1, {total_needles}] (one query per needle at most)")
    if seq_len < used + 1:
        raise ValueError(f"seq_len={seq_len} too short for {total_needles} needles of length {needle_len}")
    g = _gen(seed, index)
    seqs = torch.empty((batch, seq_len + 1), dtype=torch.long)
    tgt = torch.full((batch, seq_len + 1), -100, dtype=torch.long)
    for b in range(batch):
        n_fill = seq_len + 1 - used
        body = torch.randint(*FILLER, (n_fill,), generator=g).tolist()
        types = (torch.arange(n_types).repeat_interleave(n_needles))[torch.randperm(total_needles, generator=g)]
        cuts = sorted(torch.randint(0, n_fill + 1, (total_needles,), generator=g).tolist())
        s, prev, needles = [BOS], 0, []
        for ty, cut in zip(types.tolist(), cuts):
            s += body[prev:cut]
            content = torch.randint(*VALUES, (needle_len,), generator=g).tolist()
            s += [TYPES[ty]] + content
            needles.append((ty, content))
            prev = cut
        s += body[prev:]
        ask_type = int(torch.randint(0, n_types, (1,), generator=g))
        asks = [(ask_type, int(torch.randint(0, n_needles, (1,), generator=g)))]
        if n_queries > 1:                                   # further queries: other needles, in random order
            rest = [(t, o) for t in range(n_types) for o in range(n_needles) if (t, o) != asks[0]]
            asks += [rest[i] for i in torch.randperm(len(rest), generator=g)[: n_queries - 1].tolist()]
        starts = []
        for ask_type, ordinal in asks:
            answer = [c for ty, c in needles if ty == ask_type][ordinal]
            s += [QUERY, TYPES[ask_type], ORDINALS[ordinal]]
            starts.append((len(s), answer))
            s += answer
        seqs[b] = torch.tensor(s)
        for start, answer in starts:
            tgt[b, start:start + needle_len] = torch.tensor(answer)
    return seqs[:, :-1].contiguous(), tgt[:, 1:].contiguous()


@torch.no_grad()
def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor | None = None,
                    window: int | None = None) -> dict:
    """Token accuracy over answer positions and exact-match over sequences (all answer tokens right); with inputs
    and the attention window also the token accuracy split by dependency distance: answer_acc_near (distance <=
    window) and answer_acc_far (> window), with their answer counts (nan accuracy when a bucket is empty)."""
    mask = targets != -100
    correct = (logits.argmax(-1) == targets) & mask
    tok = correct.sum().item() / max(mask.sum().item(), 1)
    seq_ok = ((correct | ~mask).all(-1) & mask.any(-1)).float()
    out = {"answer_acc": tok, "exact_match": seq_ok.sum().item() / max(mask.any(-1).sum().item(), 1)}
    if inputs is not None and window is not None:
        far = answer_distances(inputs, targets) > window
        for name, sel in (("near", mask & ~far), ("far", mask & far)):
            n = sel.sum().item()
            out[f"answer_acc_{name}"] = (correct & sel).sum().item() / n if n else float("nan")
            out[f"n_answers_{name}"] = n
    return out


def answer_distances(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) dependency distance of every answer position (0 elsewhere): how far back the model must look.

    retrieval: the query key sits at the answer position p (input p = key, target p = value); its pair is the
    first earlier occurrence of that key (keys are unique per sequence): distance = p - that position.
    mrcr: a query `QUERY TYPE ORDINAL` asks for the ORDINAL-th needle of TYPE; every answer token gets distance =
    (position of the last QUERY before it) - (position of that query's needle's TYPE token)."""
    dist = torch.zeros_like(targets)
    for b in range(inputs.shape[0]):
        x = inputs[b].tolist()
        answers = (targets[b] != -100).nonzero().flatten().tolist()
        if QUERY in x:
            queries = [i for i, t in enumerate(x) if t == QUERY]
            for p in answers:
                qp = max(q for q in queries if q < p)
                ty, ordinal = x[qp + 1], x[qp + 2] - ORDINALS[0]
                dist[b, p] = qp - [i for i in range(queries[0]) if x[i] == ty][ordinal]
        else:
            for p in answers:
                dist[b, p] = p - x.index(x[p])
    return dist
