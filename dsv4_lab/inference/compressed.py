"""The compressed branch of a cached CSA / HCA step (docs §6.2): feed the chunk through the compressor states,
emit the entries of every block completed in this chunk into the block cache, and build the mask of compressed
entries each query attends to (CSA: the indexer's top-k; HCA: all visible).

It reuses the layer's own pieces (Compressor.project / finish, pool_overlap / pool_plain, Indexer.queries /
head_weights / _rotate_quant, index_scores / topk_select), so the math is the full forward's.
"""
from __future__ import annotations

import torch

from ..attention.compressor import pool_overlap, pool_plain
from ..attention.indexer import index_scores, selection_mask, topk_select, visible_entries


def feed_compressor(comp, st, u: torch.Tensor, p0: int) -> tuple[torch.Tensor, int]:
    """Push the chunk u (B, T, d) at positions p0.. through compressor `comp` with state `st` (CompressorState).

    Returns (pooled (B, n_new, c) before norm/RoPE, index of the first new entry). The state afterwards holds the
    (kv, score + ape) rows of the incomplete block and, with overlap, the last complete block (docs §6.1)."""
    m = comp.m
    B, T, _ = u.shape
    C, Z = comp.project(u)                                                 # (B, T, k*c) fp32
    pos = torch.arange(p0, p0 + T, device=u.device)
    Z = Z + comp.ape.to(Z.dtype)[pos % m]                                 # the stored score includes ape
    r0 = p0 % m                                                            # tail rows already in the state
    cur = slice(m, 2 * m) if comp.overlap else slice(0, m)
    C = torch.cat([st.kv[:, cur][:, :r0].to(C.dtype), C], 1)               # stream from the current block start
    Z = torch.cat([st.score[:, cur][:, :r0].to(Z.dtype), Z], 1)
    n_new, first = (r0 + T) // m, p0 // m
    Cb = C[:, : n_new * m].unflatten(1, (n_new, m))                        # (B, n_new, m, k*c)
    Zb = Z[:, : n_new * m].unflatten(1, (n_new, m))
    if n_new == 0:                                                         # no block completed in this chunk
        pooled = C.new_zeros(B, 0, comp.c)
    elif comp.overlap:
        c = comp.c
        prev = (st.kv[:, :m, :c], st.score[:, :m, :c]) if first > 0 else (None, None)
        pooled = pool_overlap(Cb, Zb, *prev)
        st.kv[:, :m], st.score[:, :m] = Cb[:, -1], Zb[:, -1]               # last complete block -> "previous" rows
    else:
        pooled = pool_plain(Cb, Zb)
    left = r0 + T - n_new * m                                              # rows of the new incomplete block
    st.kv[:, cur], st.score[:, cur] = 0.0, float("-inf")
    st.kv[:, cur.start:cur.start + left] = C[:, n_new * m:]
    st.score[:, cur.start:cur.start + left] = Z[:, n_new * m:]
    return pooled, first


def _append_entries(store, lc, entries: torch.Tensor, first: int, total: int) -> torch.Tensor:
    """Write entries (B, n, c) as entries first.. of the block cache, then read all `total` back (B, total, c)."""
    dev = entries.device
    if entries.shape[1]:
        store.write(lc.entry_rows(torch.arange(first, first + entries.shape[1], device=dev)), entries)
    return store.read(lc.entry_rows(torch.arange(total, device=dev)))


def cached_compressed(attn, lc, u: torch.Tensor, cq, q, pos: torch.Tensor, p0: int):
    """Compressed entries (B, S, c) visible to this chunk (all stored so far) and their mask (B, T, S)."""
    cfg = attn.cfg
    B, T, _ = u.shape
    m = lc.m
    S = (p0 + T) // m                                                      # entries after this chunk
    pooled, first = feed_compressor(attn.compressor, lc.states["main"], u, p0)
    new = attn.compressor.finish(pooled, attn.rope, first)
    if new.shape[1]:                                                       # stored as the full forward does
        new = attn.kv_qat(new)
    entries = _append_entries(lc.comp, lc, new, first, S)
    visible = visible_entries(pos, S, m)                                   # (T, S)
    if attn.layer_type == "hca" or cfg.index_mode == "all" or getattr(attn, "indexer_stage", "") == "warmup":
        return entries, visible[None].expand(B, T, S)
    if cfg.index_mode != "learned":
        raise NotImplementedError(f"cached decode with index_mode={cfg.index_mode!r} is not implemented: "
                                  "'learned' and 'all' are (oracle / random are study selectors, not decoders)")
    idx = attn.indexer
    ipooled, _ = feed_compressor(idx.compressor, lc.states["index"], u, p0)
    ikeys_new = idx.compressor.finish(ipooled, attn.rope, first)
    if ikeys_new.shape[1]:
        ikeys_new = idx._rotate_quant(ikeys_new)                           # Hadamard (+ MXFP4 when quant=fp4)
    ikeys = _append_entries(lc.index, lc, ikeys_new, first, S)             # (B, S, c_I)
    latent = cq if cq is not None else u
    scores = index_scores(idx.queries(latent, pos, attn.rope), ikeys, idx.head_weights(u))
    sel = topk_select(scores, visible, cfg.index_topk)
    return entries, selection_mask(sel, S)
