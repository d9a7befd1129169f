"""Data without downloads: byte-level corpora (corpus.py) and synthetic long-range tasks (synthetic.py).

`Batches(train_cfg)` yields the batch of any step as a pure function of (seed, step, rank), which makes runs
reproducible across restarts: a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import numpy as np
import torch

from . import synthetic
from .corpus import load_shakespeare, load_stdlib

__all__ = ["Batches", "Prefetched", "load_stdlib", "load_shakespeare", "synthetic"]


class Batches:
    def __init__(self, data: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 task_n_pairs: int = 8, task_n_queries: int = 4, task_n_needles: int = 3, task_n_near: int = 0,
                 task_mrcr_queries: int = 1):
        self.data, self.seq_len, self.batch_size, self.seed, self.rank = data, seq_len, batch_size, seed, rank
        self.task = dict(n_pairs=task_n_pairs, n_queries=task_n_queries, n_needles=task_n_needles,
                         n_near=task_n_near, mrcr_queries=task_mrcr_queries)
        self.meta: dict = {"corpus": data}
        if data in ("stdlib", "shakespeare"):
            self.train, self.val, self.meta = load_stdlib() if data == "stdlib" else load_shakespeare()
            for name, arr in (("train", self.train), ("val", self.val)):
                if arr.size <= seq_len + 1:
                    raise ValueError(f"{data} {name} split has {arr.size} bytes, fewer than seq_len+1={seq_len + 1}")
        elif data not in ("retrieval", "mrcr"):
            raise ValueError(f"data={data!r}: allowed are 'stdlib', 'shakespeare', 'retrieval', 'mrcr'")

    @property
    def is_task(self) -> bool:
        return self.data in ("retrieval", "mrcr")

    def _text(self, arr: np.ndarray, g: torch.Generator):
        starts = torch.randint(0, arr.size - self.seq_len - 1, (self.batch_size,), generator=g).numpy()
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None]
        chunk = torch.from_numpy(arr[idx].astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def _make(self, split: str, index: int):
        stream = 0 if split == "train" else 1
        key = ((self.seed * 7919 + stream) * 1_000_003 + index) * 131 + self.rank
        if self.data == "retrieval":
            return synthetic.retrieval_batch(self.batch_size, self.seq_len, self.task["n_pairs"],
                                             self.task["n_queries"], seed=key, index=0, n_near=self.task["n_near"])
        if self.data == "mrcr":
            return synthetic.mrcr_batch(self.batch_size, self.seq_len, self.task["n_needles"], seed=key, index=0,
                                        n_queries=self.task["mrcr_queries"])
        g = torch.Generator().manual_seed(key)
        return self._text(self.train if split == "train" else self.val, g)

    def train_batch(self, step: int):
        """(input_ids, targets) of shape (batch_size, seq_len) for this step and rank."""
        return self._make("train", step)

    def val_batch(self, i: int):
        """The i-th fixed validation batch (the same every evaluation)."""
        return self._make("val", i)


class Prefetched:
    """`Batches` (or any object with train_batch / val_batch / is_task) whose next training batch is built in a
    background thread while the current step runs: a GPU step leaves the host waiting on the device, and the
    synthetic tasks cost ~10 ms of Python per batch (32-64 sequences of 512 tokens). The batches are the same:
    each is a pure function of (seed, step), built by its own generator."""

    def __init__(self, batches, last_step: int):
        from concurrent.futures import ThreadPoolExecutor
        self.batches, self.last_step = batches, last_step
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pending = None                                # (step, future)

    @property
    def is_task(self) -> bool:
        return self.batches.is_task

    def train_batch(self, step: int):
        if self.pending is not None and self.pending[0] == step:
            out = self.pending[1].result()
        else:
            out = self.batches.train_batch(step)
        self.pending = None
        if step + 1 <= self.last_step:
            self.pending = (step + 1, self.pool.submit(self.batches.train_batch, step + 1))
        return out

    def val_batch(self, i: int):
        return self.batches.val_batch(i)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending = None
