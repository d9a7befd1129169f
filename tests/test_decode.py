"""Decode with the heterogeneous KV cache (dsv4_lab/inference, docs §6): the cached forward over any chunking equals
the full forward; the cache allocates exactly the bytes accounting.kv_cache_bytes predicts; generation.

Parity configs follow docs/hf_parity.md H1: index_topk >= #entries, or 16 index heads, so the top-k has no exact ties.
"""
import contextlib

import pytest
import torch

from dsv4_lab import DSV4LM, ModelConfig
from dsv4_lab.accounting import kv_cache_bytes
from numerics import U32, U_BF16, U_FP8, replayed_quantizers


T = 40                                    # 10 CSA blocks (m=4), 5 HCA blocks (m'=8), window 8: every ring wraps
CHUNKINGS = {"prefill": [T], "one-by-one": [1] * T, "uneven": [5, 11, 1, 3, 9, 2, 6, 3]}


def build(**over):
    base = dict(window=8, csa_ratio=4, hca_ratio=8, max_seq_len=64, index_topk=16)
    cfg = ModelConfig.from_preset("tiny", **{**base, **over})
    torch.manual_seed(0)
    model = DSV4LM(cfg).eval()
    with torch.no_grad():                                    # non-trivial sinks / ape (zeros at init)
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", "ape")):
                p.normal_(0, 0.5)
    return model


def run_chunks(model, ids, chunks, storage="fp32"):
    cache = model.new_cache(ids.shape[0], ids.shape[1], storage=storage)
    outs, s = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(ids[:, s:s + n], cache=cache).logits)
            s += n
    assert s == ids.shape[1] and cache.length == s
    return torch.cat(outs, 1), cache


CONFIGS = {
    "dense+swa": dict(layer_types=["dense", "swa"]),
    "csa+hca": dict(layer_types=["csa", "hca"]),
    "csa-topk16heads": dict(layer_types=["csa", "csa"], index_topk=3, index_n_heads=16),
    "csa-no-overlap": dict(layer_types=["csa", "hca"], compressor_overlap=False),
    "csa-all-no-window": dict(layer_types=["csa", "hca"], index_mode="all", window_branch=False),
    "flash-mix-plainq": dict(layer_types="flash:4", q_lora_rank=0, o_groups=0),
    "qat-fp4": dict(layer_types=["csa", "hca", "swa"], quant="fp4"),
    "mhc+moe-hash": dict(layer_types="flash:4", residual="mhc", ffn="moe", n_hash_layers=2),
    # the study selectors decode too: oracle picks = top-3 of the dense attention probabilities (a near tie within
    # the fp32 noise of ~1e-6 relative would flip a pick: ~1e-6 x 10 entries x 80 rows per layer, < 1e-3 a run);
    # random picks = a fixed hash of (row, position, entry), identical however the sequence is chunked
    "csa-oracle": dict(layer_types=["csa", "hca"], index_topk=3, index_mode="oracle"),
    "csa-random": dict(layer_types=["csa", "csa"], index_topk=3, index_mode="random"),
}


# Cached vs full forward in fp32: the same math with other GEMM shapes and summation orders. Error model: ~30
# sequential reductions (4 layers x ~7 + the head) of length K <= 128, each reordered: at most K u32 = 7.6e-6 of
# its scale each, independent errors adding in quadrature: sqrt(30) x 7.6e-6 = 4.2e-5 of the logits' scale.
# TOL_CACHED = 1e-4 (2.4 x that: a max over 20k logits). Decisions: top-k has >= 16 index heads or k >= #entries
# (no near ties, docs/hf_parity.md H1); learned routing (mhc+moe-hash) needs a router score gap below ~1e-6
# relative to flip, ~1e-4 per run; quantiser buckets are decided on the full run's inputs (numerics.
# replayed_quantizers). A bucket flips when its input lies within the fp32 noise (~1e-6 relative) of a rounding
# boundary: probability ~1e-6 / (relative grid step 1/16) per element, ~5e-4 per 32-128-wide row; FLIP_FRACTION
# bounds the fraction of rows whose own decision differs (so the replay cannot hide a systematic difference).
TOL_CACHED = 1e-4
FLIP_FRACTION = 1e-2


def check_cached_vs_full(name: str, seed: int = 0):
    model = build(**CONFIGS[name])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (2, T), generator=g)
    quant = model.cfg.quant != "none"
    with replayed_quantizers() if quant else contextlib.nullcontext() as book:
        with torch.no_grad():
            full = model(ids).logits
        scale = full.abs().max()
        if quant:
            book["record"] = False
        out = [(f"{name} {label}", float((run_chunks(model, ids, chunks)[0] - full).abs().max() / scale), TOL_CACHED)
               for label, chunks in CHUNKINGS.items()]
    if quant:                            # every quantised row of the cached runs is a row of the full run ...
        out.append((f"{name} unmatched rows", 1 - book["matched"] / book["rows"], 1e-9))
        out.append((f"{name} flipped rows", book["flipped"] / book["rows"], FLIP_FRACTION))   # ... decided alike
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_forward_equals_full_forward(name):
    for what, err, tol in check_cached_vs_full(name):
        assert err <= tol, (what, err, tol)


# Lossy KV storage: every value the attention reads from the cache is rounded once to the storage format (relative
# error <= u: u_bf16 = 2^-9; "paper" = FP8 E4M3 u_fp8 = 2^-4 on the non-RoPE dims, BF16 RoPE dims, MXFP4 indexer keys
# that only rank entries and k >= #entries here). First-order model: each of the L = 4 layers' attention reads adds
# a relative error <= u to its output, carried through the rest of the network with gain g <= 1 (residual + norms):
# ||a - full|| / ||full|| <= L u. Relative Frobenius norms: a max over 20k logits is dominated by a few outliers.
# A dense FFN: learned routing would turn the storage error into routing flips (a different, discrete error).
# Chunking invariance: both runs round the same values, which differ by fp32 reassociation only (delta = the
# cached-vs-full bound above, sqrt(30) x 128 u32 = 4.2e-5 relative); a value within delta of a rounding boundary
# (probability p = delta / 2u) moves by one step 2u, a fraction p of the values: relative norm sqrt(p) 2u per
# layer, so ||a - b|| / ||full|| <= L (delta + sqrt(p) 2u).
LOSSY = {"bf16": U_BF16, "paper": U_FP8}


def check_lossy_storage(seed: int = 0):
    model = build(layer_types="flash:4", ffn="dense")
    L = len(model.cfg.layer_types)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, T), generator=g)
    with torch.no_grad():
        full = model(ids).logits
    rel = lambda x, y: float((x - y).norm() / y.norm())
    out = []
    for storage, u in LOSSY.items():
        a, _ = run_chunks(model, ids, [T], storage)
        b, _ = run_chunks(model, ids, CHUNKINGS["uneven"], storage)
        e = rel(a, full)
        out.append((f"lossy {storage} vs fp32", e, L * u))
        out.append((f"lossy {storage} is lossy (u / 20 over error)", u / 20 / max(e, 1e-30), 1.0))
        delta = 30 ** 0.5 * 128 * U32
        p = delta / (2 * u)
        out.append((f"lossy {storage} chunking", rel(a, b), L * (delta + p ** 0.5 * 2 * u)))
    return out


def test_lossy_storage_is_close_and_chunking_invariant():
    for what, err, tol in check_lossy_storage():
        assert err <= tol, (what, err, tol)


@pytest.mark.parametrize("over", [dict(layer_types=["dense", "swa"]), dict(layer_types="flash:6"),
                                  dict(layer_types="pro:4", compressor_overlap=False),
                                  dict(layer_types=["csa", "hca"], head_dim=64, rope_head_dim=16, index_head_dim=64)])
@pytest.mark.parametrize("storage", ["fp32", "bf16", "paper"])
def test_allocated_bytes_equal_accounting(over, storage):
    model = build(**over)
    for max_len in (16, 64):                                  # multiples of one block, lcm(m, m') = 8
        cache = model.new_cache(3, max_len, storage=storage)
        assert cache.nbytes() == 3 * kv_cache_bytes(model.cfg, max_len, storage, include_state=True)
        assert cache.nbytes(include_state=False) == 3 * kv_cache_bytes(model.cfg, max_len, storage)


def test_paper_storage_formats():
    """FP8 E4M3 + UE8M0/64 on the non-RoPE dims with BF16 RoPE dims; MXFP4 indexer keys (docs §6.3)."""
    from dsv4_lab.inference.cache import EntryStore
    from dsv4_lab.quant import fake_quant_fp8, fake_quant_mxfp4_ref
    x = torch.randn(5, 3, 96) * torch.logspace(-2, 2, 96)
    main = EntryStore(15, 96, "paper", "main", rope_dim=16)
    y = main.roundtrip(x)
    assert torch.equal(y[..., :80], fake_quant_fp8(x[..., :80], 64))
    assert torch.equal(y[..., 80:], x[..., 80:].to(torch.bfloat16).float())
    idx = EntryStore(15, 48, "paper", "index")
    xi = x[..., :48]
    assert torch.equal(idx.roundtrip(xi), fake_quant_mxfp4_ref(xi))
    rows = torch.tensor([[4, 0, 9], [1, 2, 3], [14, 13, 12], [5, 6, 7], [8, 10, 11]])
    main.write(rows, x)
    assert torch.equal(main.read(rows), y)


def test_paper_indexer_keys_reach_the_top_k_packed():
    """Storage "paper" keeps indexer keys as MXFP4; with whole 32-value blocks (index_head_dim 32) the cache hands
    them to the top-k packed (EntryStore.read_packed -> MXFP4Keys, unpacked by the top-k: a quarter of the bytes on
    the GPU's score kernel). The values are the unpacked ones, so decode is bit for bit the run that reads them
    unpacked, in every chunking; every read of indexer keys with rows to read takes the packed path."""
    from dsv4_lab.inference.cache import EntryStore
    model = build(layer_types=["csa", "hca", "csa"], index_head_dim=32, index_topk=3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))
    calls = []
    orig = EntryStore.read_packed

    def counting(self, idx):
        out = orig(self, idx)
        calls.append((idx.numel() > 0, out is not None))
        return out
    for chunks in CHUNKINGS.values():
        calls.clear()
        EntryStore.read_packed = counting
        try:
            packed, _ = run_chunks(model, ids, chunks, "paper")
        finally:
            EntryStore.read_packed = orig
        with_rows = [p for n, p in calls if n]                          # chunks before the first entry read none
        assert len(with_rows) >= 2 and all(with_rows), (chunks, calls)  # 2 CSA layers, every chunk after it
        EntryStore.read_packed = lambda self, idx: None                  # every read unpacked
        try:
            unpacked, _ = run_chunks(model, ids, chunks, "paper")
        finally:
            EntryStore.read_packed = orig
        assert torch.equal(packed, unpacked), chunks


def test_generate_greedy_equals_naive_argmax_loop():
    from dsv4_lab import generate
    model = build(layer_types="flash:4")
    prompt = torch.randint(0, 256, (2, 13))
    out = generate(model, prompt, 9, prefill_chunk=5)
    ids = prompt
    with torch.no_grad():
        for _ in range(9):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    g = lambda: torch.Generator().manual_seed(3)
    s1 = generate(model, prompt, 6, temperature=1.0, top_k=5, generator=g())
    assert torch.equal(s1, generate(model, prompt, 6, temperature=1.0, top_k=5, generator=g()))
    assert torch.equal(generate(model, prompt, 6, temperature=1.0, top_k=1), out[:, :19])


def test_cache_bounds_are_checked():
    model = build(layer_types=["swa", "csa"])
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="storage"):
        model.new_cache(1, 8, storage="fp16")
