"""The heterogeneous KV cache of DeepSeek-V4 decode (docs §6): the storage the attention layers read and update.

    cache = model.new_cache(batch_size, max_len, storage="fp32")   # "fp32" | "bf16" | "paper"
    out = model(prompt_ids, cache=cache)                             # prefill (any chunk size)
    out = model(next_ids[:, None], cache=cache)                      # then one token at a time

Layout (the paper's Fig. 6, docs §6.1):

    state cache (fixed size per request, like an SSM state)     block cache (grows with the sequence)
    ------------------------------------------------------      ---------------------------------------------------
    per layer: window ring of `window` entries (slot p % W)      one logical block = lcm(m, m') tokens of every
    per CSA/HCA layer: compressor state = the uncompressed       layer: lcm/m CSA entries (+ as many indexer keys),
      tail as already-projected fp32 (kv, score) rows,             lcm/m' HCA entries; a block table maps a request's
      score incl. `ape` (CSA: 2m rows x 2c ch, prev + current    logical block j to a physical block of a shared pool
      block; its indexer 2m x 2c^I; HCA m' x c)                  ("dense" lab layers keep every token: n entries)

Storage formats (`storage`, docs §6.3): "fp32" / "bf16" keep every value at 4 / 2 bytes; "paper" stores main
entries as FP8 E4M3 on the c - r non-RoPE dims with one UE8M0 byte per 64, the r RoPE dims in BF16, and indexer keys
as packed MXFP4 (E2M1 pairs per byte + one E8M0 byte per 32). Compressor states stay fp32 (as in the reference).
The CSA selection reads those keys packed where they fill whole 32-value blocks (`read_packed`: the score kernel
unpacks them to the same values).
Every key the attention reads, old or new, goes through the same storage round trip, so results do not depend on
how the sequence is chunked. With storage="fp32" the cached forward equals the full forward (tests/test_decode.py).

All sequences of a batch have the same length (sequences of different lengths: batch_invariance.RaggedCache, one
cache each). Decode is the model's own forward with this cache (attention/attention.py): each layer asks its
LayerCache for the window keys (`window_keys`), streams its compressors through `states[...]`
(attention/compressor.py `Compressor.step`), appends and reads compressed entries (`append_entries`);
DSV4LM.forward advances `length` (`advance`). This file holds storage only, no attention math.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig

STORAGES = ("fp32", "bf16", "paper")


# ---------------------------------------------------------------------------------------------------------------
# Entry storage: rows of c values in one of the formats (docs §6.3)
# ---------------------------------------------------------------------------------------------------------------

class EntryStore:
    """`rows` entries of `dim` values. write(idx, x) / read(idx) with idx any long tensor of row numbers;
    x (..., dim) -> stored; read returns fp32 (..., dim). kind "main" (FP8 + BF16 RoPE) or "index" (MXFP4)."""

    def __init__(self, rows: int, dim: int, storage: str, kind: str = "main", rope_dim: int = 0, device=None):
        if storage not in STORAGES:
            raise ValueError(f"storage {storage!r} is not allowed: one of {STORAGES}")
        self.dim, self.storage, self.kind, self.rope_dim = dim, storage, kind, rope_dim
        z = lambda n, dt: torch.zeros(rows, n, dtype=dt, device=device)
        if storage == "fp32":
            self.t = {"x": z(dim, torch.float32)}
        elif storage == "bf16":
            self.t = {"x": z(dim, torch.bfloat16)}
        elif kind == "main":
            nope = dim - rope_dim
            self.t = {"nope": z(nope, torch.float8_e4m3fn), "scale": z(math.ceil(nope / 64), torch.uint8),
                      "rope": z(rope_dim, torch.bfloat16)}
        else:
            self.t = {"codes": z(math.ceil(dim / 2), torch.uint8), "scale": z(math.ceil(dim / 32), torch.uint8)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.t.values())

    # encode / decode -----------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict:
        x = x.float()
        if self.storage == "fp32":
            return {"x": x}
        if self.storage == "bf16":
            return {"x": x.to(torch.bfloat16)}
        if self.kind == "main":
            from ..quant.fp8 import fp8_quantize
            nope, rope = x[..., : self.dim - self.rope_dim], x[..., self.dim - self.rope_dim:]
            q, e = fp8_quantize(nope, 64)                                   # E4M3 + UE8M0 per 64 (docs §6.3)
            return {"nope": q, "scale": (e + 127).to(torch.uint8), "rope": rope.to(torch.bfloat16)}
        from ..quant.mxfp4 import mxfp4_pack
        codes, scale = mxfp4_pack(x)                                        # E2M1 pairs per byte, E8M0 per 32
        return {"codes": codes, "scale": scale}

    def decode(self, t: dict) -> torch.Tensor:
        if self.storage in ("fp32", "bf16"):
            return t["x"].float()
        from ..quant.fp8 import from_blocks, pow2, to_blocks
        if self.kind == "main":
            nope = t["nope"].float()
            s = pow2(t["scale"].to(torch.int32) - 127)[..., None]
            nope = from_blocks(to_blocks(nope, 64) * s, nope.shape[-1])
            return torch.cat([nope, t["rope"].float()], -1)
        from ..quant.mxfp4 import e2m1_values, mxfp4_unpack
        v = e2m1_values(mxfp4_unpack(t["codes"]))[..., : self.dim]
        s = pow2(t["scale"].to(torch.int32) - 127)[..., None]
        return from_blocks(to_blocks(v, 32) * s, self.dim)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What reading x back after writing it gives (fp32)."""
        return self.decode(self.encode(x)) if x.numel() else x.float()

    def write(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        if idx.numel():
            for k, v in self.encode(x).items():
                self.t[k][idx] = v

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        if not idx.numel():
            return torch.zeros(*idx.shape, self.dim, device=idx.device)
        return self.decode({k: v[idx] for k, v in self.t.items()})

    def read_packed(self, idx: torch.Tensor):
        """Rows idx as stored, not unpacked: MXFP4Keys (kernels/indexer_topk) for indexer keys of the "paper" storage
        whose dim is whole 32-value blocks (its score kernel unpacks them: a quarter of the bf16 bytes; the same
        values as read); None for every other store."""
        if self.storage != "paper" or self.kind != "index" or self.dim % 32 or not idx.numel():
            return None
        from ..kernels.indexer_topk import MXFP4Keys
        return MXFP4Keys(self.t["codes"][idx], self.t["scale"][idx])


# ---------------------------------------------------------------------------------------------------------------
# Per-layer caches
# ---------------------------------------------------------------------------------------------------------------

class CompressorState:
    """The uncompressed tail of one compressor (docs §6.1): fp32 (kv, score) rows; score starts at -inf.
    overlap (CSA): rows [0, m) = previous complete block, [m, 2m) = current block, channels 2c; else m rows x c."""

    def __init__(self, B: int, m: int, ch: int, overlap: bool, device=None):
        rows = 2 * m if overlap else m
        self.m, self.overlap = m, overlap
        self.kv = torch.zeros(B, rows, ch, device=device)
        self.score = torch.full((B, rows, ch), float("-inf"), device=device)

    def nbytes(self) -> int:
        return (self.kv.numel() + self.score.numel()) * 4


class LayerCache:
    """Everything one attention layer keeps: its state-cache part and its block-cache part."""

    def __init__(self, cfg: ModelConfig, layer_type: str, B: int, max_len: int, storage: str, block_table, device):
        c, r = cfg.head_dim, cfg.rope_head_dim
        self.layer_type, self.B = layer_type, B
        self.block_table = block_table                                   # (B, n_blocks) long, shared by layers
        self.states: dict[str, CompressorState] = {}
        self.comp = self.index = None
        if layer_type == "dense":                                        # lab baseline: every token, flat per request
            self.window, self.n_tokens = None, max_len
            self.main = EntryStore(B * max_len, c, storage, "main", r, device)
            return
        self.window = cfg.window
        self.main = EntryStore(B * cfg.window, c, storage, "main", r, device)       # the ring (state cache)
        if layer_type in ("csa", "hca"):
            m = cfg.csa_ratio if layer_type == "csa" else cfg.hca_ratio
            self.m = m
            self.per_block = block_tokens(cfg) // m                      # entries of this layer per logical block
            n_phys = block_table.numel()
            self.comp = EntryStore(n_phys * self.per_block, c, storage, "main", r, device)
            overlap = layer_type == "csa" and cfg.compressor_overlap
            self.states["main"] = CompressorState(B, m, (2 if overlap else 1) * c, overlap, device)
            if layer_type == "csa":
                self.index = EntryStore(n_phys * self.per_block, cfg.index_head_dim, storage, "index", 0, device)
                self.states["index"] = CompressorState(B, m, (2 if overlap else 1) * cfg.index_head_dim, overlap,
                                                       device)

    # row addressing ------------------------------------------------------------------------------------------
    def ring_rows(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, T) rows of the window ring for absolute positions pos (T,) (slot p % W)."""
        b = torch.arange(self.B, device=pos.device)[:, None]
        if self.window is None:
            return b * self.n_tokens + pos[None]
        return b * self.window + (pos % self.window)[None]

    def entry_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, S) physical rows of compressed entries idx (S,), through the block table."""
        phys = self.block_table[:, idx // self.per_block]                # (B, S) physical blocks
        return phys * self.per_block + (idx % self.per_block)[None]

    # what the attention layer calls (attention/attention.py) ------------------------------------------------
    def window_keys(self, kv: torch.Tensor, p0: int) -> tuple[torch.Tensor, int]:
        """The uncompressed entries a chunk kv (B, T, c) at positions p0.. attends to, and their first position k0:
        (keys (B, p0 + T - k0, c) fp32, k0) = the ring's entries k0 .. p0-1 (k0 = max(0, p0 - window + 1); every
        earlier token for "dense") followed by the chunk, read back as stored. Writes the chunk into the ring."""
        B, T, _ = kv.shape
        dev = kv.device
        pos_new = torch.arange(p0, p0 + T, device=dev)
        new = self.main.roundtrip(kv)                                      # exactly what a later read returns
        k0 = 0 if self.window is None else max(0, p0 - self.window + 1)     # the ring still holds k0 .. p0-1
        old_pos = torch.arange(k0, p0, device=dev)
        old = self.main.read(self.ring_rows(old_pos)) if len(old_pos) else new[:, :0]
        keep = pos_new if self.window is None else pos_new[-self.window:]  # the ring keeps the last W
        self.main.write(self.ring_rows(keep), kv[:, T - len(keep):])
        return torch.cat([old, new], 1), k0

    def append_entries(self, kind: str, new: torch.Tensor, first: int, total: int, packed: bool = False):
        """Write new (B, n, c) as compressed entries first .. first+n-1 of store `kind` ("comp" main entries or
        "index" indexer keys) through the block table, then read entries 0 .. total-1 back: (B, total, c) fp32, or
        with packed=True the stored MXFP4 parts where the store keeps them (EntryStore.read_packed)."""
        store = self.comp if kind == "comp" else self.index
        dev = new.device
        if new.shape[1]:
            store.write(self.entry_rows(torch.arange(first, first + new.shape[1], device=dev)), new)
        rows = self.entry_rows(torch.arange(total, device=dev))
        out = store.read_packed(rows) if packed else None
        return out if out is not None else store.read(rows)

    def nbytes(self, include_state: bool = True) -> int:
        n = self.main.nbytes() + (self.comp.nbytes() if self.comp else 0) + (self.index.nbytes() if self.index else 0)
        return n + (sum(s.nbytes() for s in self.states.values()) if include_state else 0)


def block_tokens(cfg: ModelConfig) -> int:
    """Tokens covered by one block of the block cache: lcm(m, m') over the compressed layer types present."""
    ms = [cfg.csa_ratio] * ("csa" in cfg.layer_types) + [cfg.hca_ratio] * ("hca" in cfg.layer_types)
    return math.lcm(*ms) if ms else 1


class KVCache:
    """The whole cache of a batch of B requests of up to max_len tokens (see the module docstring)."""

    def __init__(self, model, batch_size: int, max_len: int, storage: str = "fp32", device=None):
        cfg: ModelConfig = model.cfg
        if storage not in STORAGES:
            raise ValueError(f"storage {storage!r} is not allowed: one of {STORAGES}")
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len {max_len!r} is not allowed: an integer in [1, max_seq_len={cfg.max_seq_len}]")
        device = device if device is not None else next(model.parameters()).device
        self.cfg, self.B, self.max_len, self.storage = cfg, batch_size, max_len, storage
        self.length = 0                                                    # tokens already in the cache
        self.token_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # ids at 0..length-1
        self.block = block_tokens(cfg)
        n_blocks = -(-max_len // self.block)
        # block table: logical block j of request b -> physical block j * B + b (requests interleave in the pool;
        # a server would hand out free blocks on demand, the addressing is the same)
        self.block_table = (torch.arange(n_blocks, device=device)[None] * batch_size
                            + torch.arange(batch_size, device=device)[:, None])
        self.layers = [LayerCache(cfg, t, batch_size, max_len, storage, self.block_table, device)
                       for t in cfg.layer_types]

    def advance(self, input_ids: torch.Tensor) -> None:
        """After every layer has run the chunk input_ids (B, T): keep its ids (for the prefix store), move on by T."""
        T = input_ids.shape[1]
        self.token_ids[:, self.length:self.length + T] = input_ids
        self.length += T

    def nbytes(self, include_state: bool = True) -> int:
        """Bytes allocated by the cache's tensors (state cache + block cache), excluding the block table."""
        return sum(lc.nbytes(include_state) for lc in self.layers)

    def layout(self) -> list[dict]:
        """One row per layer: what is stored where and how many bytes (for notebooks / docs)."""
        rows = []
        for i, lc in enumerate(self.layers):
            rows.append({"layer": i, "type": lc.layer_type,
                         "window_or_tokens": lc.window if lc.window is not None else lc.n_tokens,
                         "window_bytes": lc.main.nbytes(),
                         "compressed_entries": lc.block_table.numel() * lc.per_block if lc.comp else 0,
                         "compressed_bytes": lc.comp.nbytes() if lc.comp else 0,
                         "index_bytes": lc.index.nbytes() if lc.index else 0,
                         "state_bytes": sum(s.nbytes() for s in lc.states.values())})
        return rows
