"""The on-disk prefix cache (docs §6.4): persist a prefilled prompt's KV cache, load it for a request that shares
the prefix, with the paper's three policies for the window (SWA) part.

    save_prefix(model, cache, "p.dsv4prefix", policy="checkpoint", every=64)    # cache: after model(ids, cache=)
    cache = load_prefix(model, "p.dsv4prefix")                   # the whole stored prefix ...
    cache = load_prefix(model, "p.dsv4prefix", n_tokens=100)     # ... or a shorter prefix of it (a partial hit)
    out = model(next_ids, cache=cache)                            # decode continues as from the in-memory cache
    prefix_store_bytes("v4-flash", 10**6, "zero")                 # bytes on disk, exact for the file save writes

What a file holds (docs §6.4). Always: the prefix's token ids and every CSA / HCA compressed entry (main and
indexer) of its complete blocks, in the cache's storage format, bit for bit. The window part by policy:
  full        the window entry of every position, every layer (n rows per layer);
  checkpoint  the state cache (window ring + the compressor tail rows in use) at every multiple of `every` and
              at n;
  zero        nothing.
Lab "dense" layers keep every token; they are stored whole and only policy "full" accepts them.

What load_prefix(n_tokens=k) recomputes, and why it is exact. Loading puts the stored compressed entries into the
block cache and makes them read-only, sets the state cache at a start position s, then re-runs tokens s..k-1
through the model (one cached chunk). Everything a token's hidden state depends on is then either stored or
recomputed from exact inputs: the embedding is per token; attention at layer j reads the window entries made from
layer j's inputs at the last n_win positions, and compressed entries read from the store (never the re-run's own
pooled entries); MoE (hash or score routing), mHC and norms are per token. So:
  checkpoint  s = the latest checkpoint <= k. The state cache at s is the one stored, so every re-run token is
              exact (at most every - 1 tokens; none at a checkpoint, and loading the whole prefix gives the
              in-memory cache's tensors bit for bit, its end state being stored).
  full        the ring at any s is known from the stored window entries; what is not stored is the compressor
              tails (the rows of the incomplete block, and for the overlapping CSA compressor also the last
              complete block). s = the earliest tail start over the layers, tau = (floor(k/m) - 1) m with
              overlap, floor(k/m) m without, so each tail is re-projected from exact inputs (< 2m tokens).
  zero        no window state at all: the re-run starts with an empty ring, so layer 0's inputs are exact from s
              on, and layer j's from s + j (n_win - 1) on (each layer's window reaches n_win - 1 positions back).
              The ring of layer j (positions k-n_win..k-1) and its tails (from tau_j) are exact when
              s <= k - n_win - j (n_win - 1) and s <= tau_j - j (n_win - 1); s = k - n_win n_layers (the paper's
              "last n_win x L tokens") satisfies the first for every j, and the second whenever a tail is at most
              n_win + L - 1 long (V4: m' = n_win = 128); otherwise s moves back to the tightest tau_j - j (n_win-1).
In full and zero a layer's tail is rebuilt from re-run rows only: its rows start at tau_j >= s, and the empty tail
the re-run starts from only reaches pooled entries that the read-only block cache discards. "Exact" is the
math: the re-run uses other GEMM shapes than the original prefill, so values agree to fp32 rounding
(tests/test_prefix_store.py bounds it); with lossy storage a recomputed window entry can land in the other
rounding bucket.

save_prefix writes the compressed entries, ids and the final state from the live cache. A saved cache no longer
holds the window history that full / checkpoint store (a server captures it while it prefills), so save re-runs
the prefix through a scratch cache in chunks that end at every multiple of n_win (full) or `every` (checkpoint).

File: "DSV4LAB-PREFIX\\n", the header length (8 bytes, little endian), a JSON header (format version, config and
weights sha256, n_tokens, policy, every, storage, payload sha256 and size, and the tensor table: name, dtype,
shape, offset), then the raw tensor bytes. Nothing is unpickled; written atomically (temp + fsync + rename).
A file from another model / weights / format version, truncated or damaged, raises PrefixStoreError naming it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from ..config import ModelConfig
from ..runlog import atomic_write_bytes

MAGIC = b"DSV4LAB-PREFIX\n"
FORMAT_VERSION = 1
POLICIES = ("full", "checkpoint", "zero")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
          "uint8": torch.uint8, "int32": torch.int32}


class PrefixStoreError(ValueError):
    """A prefix file cannot be used (or save / load got a bad argument); the message names the file and why."""


# ---------------------------------------------------------------------------------------------------------------
# Adapter: the only code here that knows the cache's fields (dsv4_lab/inference/cache.py)
# ---------------------------------------------------------------------------------------------------------------

def _ratio(cfg: ModelConfig, layer_type: str) -> int:
    return cfg.csa_ratio if layer_type == "csa" else cfg.hca_ratio


def _parts(cfg: ModelConfig, storage: str, kind: str) -> dict[str, tuple[str, int]]:
    """Raw tensors of one stored entry: part name -> (dtype name, width), as EntryStore holds them (docs §6.3)."""
    dim = cfg.head_dim if kind == "main" else cfg.index_head_dim
    if storage == "fp32":
        return {"x": ("float32", dim)}
    if storage == "bf16":
        return {"x": ("bfloat16", dim)}
    if kind == "main":
        nope = dim - cfg.rope_head_dim
        return {"nope": ("float8_e4m3fn", nope), "scale": ("uint8", math.ceil(nope / 64)),
                "rope": ("bfloat16", cfg.rope_head_dim)}
    return {"codes": ("uint8", math.ceil(dim / 2)), "scale": ("uint8", math.ceil(dim / 32))}


def _state_shapes(cfg: ModelConfig, layer_type: str) -> dict[str, tuple[int, int]]:
    """Compressor tails of one layer: name -> (rows, channels) of its fp32 kv and score (docs §6.1)."""
    if layer_type not in ("csa", "hca"):
        return {}
    m = _ratio(cfg, layer_type)
    ov = layer_type == "csa" and cfg.compressor_overlap
    rows, k = (2 * m, 2) if ov else (m, 1)
    out = {"main": (rows, k * cfg.head_dim)}
    if layer_type == "csa":
        out["index"] = (rows, k * cfg.index_head_dim)
    return out


def _tail_rows(cfg: ModelConfig, layer_type: str, c: int) -> list[int]:
    """Rows of a compressor state that hold data at length c (the others are kv 0, score -inf): with overlap, rows
    [0, m) = the last complete block (once there is one) and [m, m + c % m) = the incomplete one; else [0, c % m).
    As many rows as positions tail_start(c)..c-1."""
    m = _ratio(cfg, layer_type)
    if layer_type == "csa" and cfg.compressor_overlap:
        return (list(range(m)) if c >= m else []) + list(range(m, m + c % m))
    return list(range(c % m))


def _ring_rows(lc) -> torch.Tensor:
    """(B, W) rows of the window rings in slot order (slot p % W holds position p)."""
    return lc.ring_rows(torch.arange(lc.window, device=lc.block_table.device))


def _token_rows(lc, pos: torch.Tensor) -> torch.Tensor:
    """(B, T) rows of the window ring (or a dense layer's store) that hold positions pos (T,)."""
    return lc.ring_rows(pos)


def _entry_rows(lc, n: int) -> torch.Tensor:
    """(B, n) block-cache rows of compressed entries 0..n-1."""
    return lc.entry_rows(torch.arange(n, device=lc.block_table.device))


def _read(store, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows].clone() for k, v in store.t.items()}


def _write(store, rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
    for k, v in parts.items():
        store.t[k][rows] = v.to(store.t[k].device)


def _read_states(lc, row: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Compressor tails of batch row `row`: name -> (kv, score)."""
    return {n: (s.kv[row].clone(), s.score[row].clone()) for n, s in lc.states.items()}


def _write_states(lc, states: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set the compressor tails of every batch row."""
    for n, (kv, score) in states.items():
        lc.states[n].kv[:] = kv.to(lc.states[n].kv.device)
        lc.states[n].score[:] = score.to(lc.states[n].score.device)


def _block_stores(lc) -> list:
    return [s for s in (lc.comp, lc.index) if s is not None]


@contextlib.contextmanager
def _read_only_block_cache(cache):
    """While re-running, compressed entries come from the store: writes to the block cache are dropped."""
    stores = [s for lc in cache.layers for s in _block_stores(lc)]
    for s in stores:
        s.write = lambda idx, x: None
    try:
        yield
    finally:
        for s in stores:
            del s.write


def _set_length(cache, n: int, ids: torch.Tensor) -> None:
    cache.length = n
    cache.token_ids[:, :n] = ids[:n].to(cache.token_ids.device)


# ---------------------------------------------------------------------------------------------------------------
# Layout: which tensors a file holds (shared by save, load and prefix_store_bytes)
# ---------------------------------------------------------------------------------------------------------------

def checkpoints(n: int, every: int) -> list[int]:
    """Positions whose state cache policy "checkpoint" stores: every multiple of `every` in (0, n], and n."""
    return sorted(set(range(every, n + 1, every)) | {n}) if n else []


def _layout(cfg: ModelConfig, n: int, policy: str, every: int | None, storage: str) -> list[tuple[str, str, list]]:
    """[(name, dtype, shape)] in file order."""
    out = [("ids", "int32", [n])]
    ncp = len(checkpoints(n, every)) if policy == "checkpoint" else 0
    for i, t in enumerate(cfg.layer_types):
        if t in ("csa", "hca"):
            S = n // _ratio(cfg, t)
            out += [(f"L{i}.comp.{p}", d, [S, w]) for p, (d, w) in _parts(cfg, storage, "main").items()]
            if t == "csa":
                out += [(f"L{i}.index.{p}", d, [S, w]) for p, (d, w) in _parts(cfg, storage, "index").items()]
        if t == "dense" or policy == "full":
            out += [(f"L{i}.win.{p}", d, [n, w]) for p, (d, w) in _parts(cfg, storage, "main").items()]
        elif policy == "checkpoint":
            out += [(f"L{i}.ring.{p}", d, [ncp, cfg.window, w]) for p, (d, w) in _parts(cfg, storage, "main").items()]
            used = sum(len(_tail_rows(cfg, t, c)) for c in checkpoints(n, every)) if ncp else 0
            for name, (rows, ch) in _state_shapes(cfg, t).items():             # the used rows of each checkpoint
                out += [(f"L{i}.state.{name}.{a}", "float32", [used, ch]) for a in ("kv", "score")]
    return out


def _nbytes(dtype: str, shape: list) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def _header(cfg, n, policy, every, storage, config_sha, weights_sha, payload_sha) -> bytes:
    table, off = [], 0
    for name, dtype, shape in _layout(cfg, n, policy, every, storage):
        table.append([name, dtype, shape, off])
        off += _nbytes(dtype, shape)
    h = {"format": "dsv4lab-prefix", "version": FORMAT_VERSION, "config_sha256": config_sha,
         "weights_sha256": weights_sha, "n_tokens": n, "policy": policy, "every": every, "storage": storage,
         "payload_sha256": payload_sha, "payload_bytes": off, "tensors": table}
    return json.dumps(h, sort_keys=True, separators=(",", ":")).encode()


def _file_bytes(header: bytes) -> int:
    return len(MAGIC) + 8 + len(header) + json.loads(header)["payload_bytes"]


def config_sha256(cfg: ModelConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prefix_store_bytes(config_or_name, n_tokens: int, policy: str, every: int | None = None,
                       storage: str = "paper") -> int:
    """Bytes of the file save_prefix writes for an n_tokens prefix (exact: the same layout and header).

    config_or_name: a ModelConfig or a name dsv4_lab.accounting knows ("v4-flash", "v4-pro", a preset)."""
    from ..accounting import resolve
    cfg = resolve(config_or_name)
    if not isinstance(cfg, ModelConfig):
        raise PrefixStoreError(f"model {config_or_name!r} is not allowed: a V4 ModelConfig or name (not V3.2)")
    _check_args(cfg, int(n_tokens), policy, every, storage)
    return _file_bytes(_header(cfg, int(n_tokens), policy, every, storage, "0" * 64, "0" * 64, "0" * 64))


def _check_args(cfg: ModelConfig, n: int, policy: str, every, storage: str) -> None:
    from .cache import STORAGES
    if policy not in POLICIES:
        raise PrefixStoreError(f"policy {policy!r} is not allowed: one of {POLICIES}")
    if policy == "checkpoint" and not (isinstance(every, int) and every > 0):
        raise PrefixStoreError(f"every {every!r} is not allowed with policy 'checkpoint': a positive integer")
    if policy != "checkpoint" and every is not None:
        raise PrefixStoreError(f"every {every!r} is not allowed with policy {policy!r}: only 'checkpoint' uses it")
    if storage not in STORAGES:
        raise PrefixStoreError(f"storage {storage!r} is not allowed: one of {STORAGES}")
    if n < 0:
        raise PrefixStoreError(f"n_tokens {n!r} is not allowed: a non-negative integer")
    if policy != "full" and "dense" in cfg.layer_types:
        i = cfg.layer_types.index("dense")
        raise PrefixStoreError(f"policy {policy!r} is not allowed for this model: layer {i} is 'dense' (no window "
                               "to rebuild from compressed entries); use policy 'full'")


# ---------------------------------------------------------------------------------------------------------------
# Where the re-run starts (see the module docstring)
# ---------------------------------------------------------------------------------------------------------------

def tail_start(cfg: ModelConfig, layer_type: str, k: int) -> int:
    """First position whose compressor rows the state of this layer holds at length k (k if none)."""
    if layer_type not in ("csa", "hca"):
        return k
    m = _ratio(cfg, layer_type)
    ov = layer_type == "csa" and cfg.compressor_overlap
    return (k // m) * m - (m if ov and k >= m else 0)


def recompute_start(cfg: ModelConfig, policy: str, k: int, every: int | None = None, n_stored: int | None = None) -> int:
    """Position s from which load_prefix(n_tokens=k) of an n_stored-token file re-runs tokens (k - s recomputed)."""
    taus = [tail_start(cfg, t, k) for t in cfg.layer_types]
    if policy == "full":
        return min([k] + taus)
    if policy == "checkpoint":
        return max([0] + [c for c in checkpoints(k if n_stored is None else n_stored, every) if c <= k])
    W = cfg.window
    s = min([k - W * cfg.n_layers] + [tau - j * (W - 1) for j, tau in enumerate(taus) if tau < k])
    return max(0, s)


# ---------------------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------------------

def _as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _window_history(model, ids: torch.Tensor, storage: str, policy: str, every: int | None, live, row: int):
    """Re-prefill ids (n,) through a scratch cache. full: {layer: parts of the window entries of positions 0..n-1};
    checkpoint: one [(ring parts, tails) per layer] per checkpoint. The last W positions (full) and the state at n
    (checkpoint) are taken from the live cache, bit for bit."""
    cfg, n, W = model.cfg, len(ids), model.cfg.window
    ends = sorted(set(range(W, n, W)) | {n}) if policy == "full" else [c for c in checkpoints(n, every) if c < n]
    scratch = model.new_cache(1, max(n, 1), storage=storage)
    windowed = [i for i, t in enumerate(cfg.layer_types) if t != "dense"]
    wins, snaps, p = {i: [] for i in windowed}, [], 0
    for e in ends:
        if e > p:
            model(ids[None, p:e], cache=scratch, last_only=True)
        pos = torch.arange(p, e, device=ids.device)
        for i in windowed:
            lc = scratch.layers[i]
            if policy == "full":
                wins[i].append(_read(lc.main, _token_rows(lc, pos)[0]))
        if policy == "checkpoint":
            snaps.append([(_read(lc.main, _ring_rows(lc)[0]), _read_states(lc, 0)) for lc in scratch.layers])
        p = e
    if policy == "checkpoint":
        end = [[(_read(lc.main, _ring_rows(lc)[row]), _read_states(lc, row)) for lc in live.layers]]
        return snaps + (end if n else [])
    out, tail = {}, torch.arange(max(0, n - W), n, device=ids.device)
    for i in windowed:
        lc = live.layers[i]
        parts = {k: torch.cat([c[k] for c in wins[i]]) for k in lc.main.t}
        for k, v in _read(lc.main, _token_rows(lc, tail)[row]).items():
            parts[k][max(0, n - W):] = v
        out[i] = parts
    return out


@torch.no_grad()
def save_prefix(model, cache, path, policy: str = "full", every: int | None = None, row: int = 0) -> int:
    """Write the prefix held by `cache` (row `row`, all cache.length tokens) to `path`; returns the bytes written."""
    cfg, n = model.cfg, cache.length
    _check_args(cfg, n, policy, every, cache.storage)
    if not (isinstance(row, int) and 0 <= row < cache.B):
        raise PrefixStoreError(f"row {row!r} is not allowed: an integer in [0, batch_size={cache.B})")
    ids = cache.token_ids[row, :n].clone()
    tensors = {"ids": ids.to(torch.int32)}
    was_training = model.training
    model.eval()
    hist = _window_history(model, ids, cache.storage, policy, every, cache, row) if policy != "zero" else None
    model.train(was_training)
    for i, (t, lc) in enumerate(zip(cfg.layer_types, cache.layers)):
        if t in ("csa", "hca"):
            rows = _entry_rows(lc, n // _ratio(cfg, t))[row]
            tensors.update({f"L{i}.comp.{k}": v for k, v in _read(lc.comp, rows).items()})
            if t == "csa":
                tensors.update({f"L{i}.index.{k}": v for k, v in _read(lc.index, rows).items()})
        if t == "dense":
            pos = torch.arange(n, device=ids.device)
            tensors.update({f"L{i}.win.{k}": v for k, v in _read(lc.main, _token_rows(lc, pos)[row]).items()})
        elif policy == "full":
            tensors.update({f"L{i}.win.{k}": v for k, v in hist[i].items()})
        elif policy == "checkpoint":
            stack = lambda xs, like: torch.stack(xs) if xs else like.new_zeros((0, *like.shape))
            for k in lc.main.t:
                tensors[f"L{i}.ring.{k}"] = stack([snap[i][0][k] for snap in hist], lc.main.t[k][_ring_rows(lc)[row]])
            cps = checkpoints(n, every)
            for name, st in lc.states.items():
                for j, a in enumerate(("kv", "score")):
                    tensors[f"L{i}.state.{name}.{a}"] = torch.cat(
                        [st.kv[row, :0]] + [snap[i][1][name][j][_tail_rows(cfg, t, c)] for c, snap in zip(cps, hist)])
    layout = _layout(cfg, n, policy, every, cache.storage)
    assert [x[0] for x in layout] == list(tensors), "prefix_store layout and saved tensors disagree"
    chunks = []
    for name, dtype, shape in layout:
        t = tensors[name]
        assert t.dtype == DTYPES[dtype] and list(t.shape) == shape, (name, t.dtype, list(t.shape), dtype, shape)
        chunks.append(_as_bytes(t))
    payload = b"".join(chunks)
    header = _header(cfg, n, policy, every, cache.storage, config_sha256(cfg), weights_sha256(model),
                     hashlib.sha256(payload).hexdigest())
    data = MAGIC + struct.pack("<Q", len(header)) + header + payload
    atomic_write_bytes(path, data)
    return len(data)


# ---------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------

def read_prefix_file(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a prefix file, after checking magic, version, size and sha256 (PrefixStoreError)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PrefixStoreError(f"prefix file {path} cannot be read ({type(e).__name__}: {e.strerror})") from None
    if not data.startswith(MAGIC):
        raise PrefixStoreError(f"prefix file {path} is not a dsv4-lab prefix file (no {MAGIC[:-1].decode()} magic)")
    p = len(MAGIC) + 8
    if len(data) < p:
        raise PrefixStoreError(f"prefix file {path} is truncated ({len(data)} bytes, inside its header)")
    (hl,) = struct.unpack("<Q", data[len(MAGIC):p])
    if len(data) < p + hl:
        raise PrefixStoreError(f"prefix file {path} is truncated ({len(data)} bytes, header needs {p + hl})")
    try:
        h = json.loads(data[p:p + hl])
        version = h["version"]
    except (ValueError, KeyError, TypeError):
        raise PrefixStoreError(f"prefix file {path} has a damaged header (not the JSON this format writes)") from None
    if version != FORMAT_VERSION:
        raise PrefixStoreError(f"prefix file {path} has format version {version!r}; this code reads version "
                               f"{FORMAT_VERSION} (re-save the prefix)")
    payload = data[p + hl:]
    try:
        want = int(h["payload_bytes"])
        sha, table = h["payload_sha256"], h["tensors"]
        for key in ("n_tokens", "policy", "every", "storage", "config_sha256", "weights_sha256"):
            h[key]
    except (KeyError, TypeError, ValueError):
        raise PrefixStoreError(f"prefix file {path} has a damaged header (missing fields)") from None
    if len(payload) != want:
        what = "truncated" if len(payload) < want else "longer than its header says"
        raise PrefixStoreError(f"prefix file {path} is {what} ({len(payload)} of {want} payload bytes)")
    if hashlib.sha256(payload).hexdigest() != sha:
        raise PrefixStoreError(f"prefix file {path} fails its sha256 check (the payload is damaged)")
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    tensors = {}
    try:
        table = [(str(name), str(dtype), [int(x) for x in shape], int(off)) for name, dtype, shape, off in table]
        if any(dtype not in DTYPES or off < 0 or off + _nbytes(dtype, shape) > want for _, dtype, shape, off in table):
            raise ValueError
    except (TypeError, ValueError):
        raise PrefixStoreError(f"prefix file {path} has a damaged header (bad tensor table)") from None
    for name, dtype, shape, off in table:
        nb = _nbytes(dtype, shape)
        tensors[name] = buf[off:off + nb].clone().view(DTYPES[dtype]).reshape(shape)
    return h, tensors


@torch.no_grad()
def load_prefix(model, path, batch_size: int = 1, n_tokens: int | None = None, max_len: int | None = None):
    """A KVCache of `batch_size` rows holding the first n_tokens (default: all) tokens of the prefix in `path`, as
    the in-memory cache after prefilling them would hold it (module docstring: what is recomputed, why exactly)."""
    cfg = model.cfg
    h, T = read_prefix_file(path)
    if h["config_sha256"] != config_sha256(cfg):
        raise PrefixStoreError(f"prefix file {path} was saved from another model config (config sha256 differs)")
    if h["weights_sha256"] != weights_sha256(model):
        raise PrefixStoreError(f"prefix file {path} was saved from other weights of this config (weights sha256 "
                               "differs)")
    n, policy, every = h["n_tokens"], h["policy"], h["every"]
    try:
        _check_args(cfg, n, policy, every, h["storage"])
        want = json.loads(_header(cfg, n, policy, every, h["storage"], "", "", ""))["tensors"]
    except (PrefixStoreError, TypeError):
        want = None
    if h["tensors"] != want:
        raise PrefixStoreError(f"prefix file {path} has a damaged header (its tensor table is not the layout of "
                               f"{n} tokens, policy {policy!r})")
    k = n if n_tokens is None else n_tokens
    if not (isinstance(k, int) and 0 <= k <= n):
        raise PrefixStoreError(f"n_tokens {n_tokens!r} is not allowed: an integer in [0, {n}] (the stored prefix)")
    max_len = cfg.max_seq_len if max_len is None else max_len
    if not (isinstance(max_len, int) and max(k, 1) <= max_len <= cfg.max_seq_len):
        raise PrefixStoreError(f"max_len {max_len!r} is not allowed: an integer in [{max(k, 1)}, "
                               f"max_seq_len={cfg.max_seq_len}]")
    dev = next(model.parameters()).device
    cache = model.new_cache(batch_size, max_len, storage=h["storage"], device=dev)
    ids = T["ids"].to(dev, torch.long)
    s = recompute_start(cfg, policy, k, every, n)
    parts = lambda prefix: {key.rsplit(".", 1)[1]: v for key, v in T.items() if key.rsplit(".", 1)[0] == prefix}
    for i, (t, lc) in enumerate(zip(cfg.layer_types, cache.layers)):
        if t in ("csa", "hca"):
            S = k // _ratio(cfg, t)
            rows = _entry_rows(lc, S)                                            # (B, S)
            _write(lc.comp, rows, {key: v[:S] for key, v in parts(f"L{i}.comp").items()})
            if t == "csa":
                _write(lc.index, rows, {key: v[:S] for key, v in parts(f"L{i}.index").items()})
        if t == "dense" or policy == "full":                                     # window entries before s
            lo = 0 if t == "dense" else max(0, s - cfg.window)
            pos = torch.arange(lo, s, device=dev)
            _write(lc.main, _token_rows(lc, pos), {key: v[lo:s] for key, v in parts(f"L{i}.win").items()})
        elif policy == "checkpoint" and s > 0:                                   # the state cache at s
            c = checkpoints(n, every).index(s)
            _write(lc.main, _ring_rows(lc),
                   {key: v[c] for key, v in parts(f"L{i}.ring").items()})
            cps = checkpoints(n, every)
            off = sum(len(_tail_rows(cfg, t, x)) for x in cps[:c])
            used = _tail_rows(cfg, t, s)
            states = {}
            for name, (rows, ch) in _state_shapes(cfg, t).items():
                kv, score = torch.zeros(rows, ch), torch.full((rows, ch), float("-inf"))
                kv[used] = T[f"L{i}.state.{name}.kv"][off:off + len(used)]
                score[used] = T[f"L{i}.state.{name}.score"][off:off + len(used)]
                states[name] = (kv, score)
            _write_states(lc, states)
    _set_length(cache, s, ids)
    if k > s:
        was_training = model.training
        model.eval()
        with _read_only_block_cache(cache):
            model(ids[None, s:k].expand(batch_size, -1), cache=cache, last_only=True)
        model.train(was_training)
    return cache
