"""The on-disk prefix cache (dsv4_lab/inference/prefix_store.py, docs §6.4): for every window policy, decoding
continued from a loaded prefix equals decoding from the in-memory cache; bad files give one clear error; the bytes
on disk are what prefix_store_bytes predicts.

Configs: window 8, m = 4 (overlapping CSA), m' = 8, stored prefix of 45 tokens; loaded at k = 45 and 37 (multiples
of no ratio), 32 (of all), 6 (shorter than the window and than m'); the other configs at 45 and 37. index_topk = 32 >= every entry count, and every
MoE layer hash-routed, so no top-k or routing decision depends on summation order (docs/hf_parity.md H1).
"""
import json
import struct

import pytest
import torch

from dsv4_lab import DSV4LM, ModelConfig
from dsv4_lab.inference import prefix_store as ps
from dsv4_lab.inference.prefix_store import (PrefixStoreError, load_prefix, prefix_store_bytes, recompute_start,
                                             save_prefix)
from numerics import U32, bound_err

N, CONT, MAX_LEN = 45, 6, 64
LENGTHS = (45, 37, 32, 6)
POLICIES = (("full", None), ("checkpoint", 16), ("zero", None))
BASE = dict(window=8, csa_ratio=4, hca_ratio=8, max_seq_len=MAX_LEN, index_topk=16)
CONFIGS = {
    "tiny": dict(),                                                   # swa, csa, hca, csa; mHC; hash-routed MoE
    "no-overlap": dict(layer_types=["csa", "hca", "swa"], compressor_overlap=False),
    # m' = 16 > n_win + L - 1 = 7: the zero policy's re-run must start before the last n_win x L tokens
    "long-hca-tail": dict(layer_types=["swa", "hca", "csa"], window=4, hca_ratio=16),
}

# Error model. The loaded state differs from the in-memory one only where load re-ran tokens: the same math over
# other GEMM shapes and key sets, so each value differs by fp32 reassociation. One reordered reduction of K terms
# errs by ~sqrt(K) u32 of its scale (independent roundings, a random walk); ~30 reductions in sequence (4 layers x
# ~7 + the head), K <= 128: sqrt(30 x 128) u32 = 3.7e-6 of the logits' norm. Continued decode reads those values
# with gain ~1 (residual + norms). TOL = 1e-5 relative (Frobenius, all continued logits) is 2.7x that.
TOL = 1e-5


def build(name="tiny", seed=0, **over):
    over = {**BASE, **CONFIGS.get(name, {}), **over}
    n_layers = len(ModelConfig.from_preset("tiny", **over).layer_types)
    cfg = ModelConfig.from_preset("tiny", **over, n_hash_layers=n_layers)           # every MoE layer hash-routed
    torch.manual_seed(seed)
    model = DSV4LM(cfg).eval()
    with torch.no_grad():                                    # non-trivial sinks / ape (zeros at init)
        for pname, p in model.named_parameters():
            if pname.endswith(("attn_sink", "ape")):
                p.normal_(0, 0.5)
    return model


def prefill(model, ids, storage="fp32"):
    cache = model.new_cache(1, MAX_LEN, storage=storage)
    if ids.shape[1]:
        with torch.no_grad():
            model(ids, cache=cache)
    return cache


def continue_logits(model, cache, ids):
    """Teacher-forced decode of ids (1, T) one token at a time -> logits (T, V)."""
    with torch.no_grad():
        return torch.cat([model(ids[:, t:t + 1], cache=cache).logits[0] for t in range(ids.shape[1])])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def check_prefix_roundtrip(seed: int = 0, names=tuple(CONFIGS), tmp=None):
    """(name, error, tolerance) for every config x policy x prefix length: continued logits loaded vs in memory."""
    import tempfile
    from pathlib import Path
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            model = build(name, seed)
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, model.cfg.vocab_size, (1, N + CONT), generator=g)
            live = prefill(model, ids[:, :N])
            for policy, every in POLICIES:
                path = Path(tmp or d) / f"{name}-{policy}.dsv4prefix"
                save_prefix(model, live, path, policy, every)
                for k in LENGTHS if name == "tiny" else LENGTHS[:2]:
                    ref = continue_logits(model, prefill(model, ids[:, :k]), ids[:, k:k + CONT])
                    got = continue_logits(model, load_prefix(model, path, n_tokens=k, max_len=MAX_LEN),
                                          ids[:, k:k + CONT])
                    out.append((f"prefix store {name} {policy} k={k}: continued logits (rel)", rel(got, ref), TOL))
    return out


def test_every_policy_continues_like_the_in_memory_cache():
    for what, err, tol in check_prefix_roundtrip():
        assert err <= tol, (what, err, tol)


def test_recompute_counts():
    """What load re-runs (module docstring): full < 2m tokens, checkpoint < every, zero n_win x L (or further back
    when a tail is longer than n_win + L - 1)."""
    cfg = build().cfg                                                   # W 8, L 4, m 4 (overlap), m' 8
    assert recompute_start(cfg, "full", 45) == 40                       # HCA's block 40.. (CSA's prev block: 40..)
    assert recompute_start(cfg, "full", 32) == 28
    assert recompute_start(cfg, "checkpoint", 45, 16, n_stored=45) == 45
    assert recompute_start(cfg, "checkpoint", 37, 16, n_stored=45) == 32
    assert recompute_start(cfg, "checkpoint", 6, 16, n_stored=45) == 0
    assert recompute_start(cfg, "zero", 45) == 45 - 8 * 4
    assert recompute_start(cfg, "zero", 6) == 0
    long = build("long-hca-tail").cfg                                   # W 4, L 3, m' 16 at layer 1
    assert recompute_start(long, "zero", 47) == min(47 - 12, 32 - 1 * 3, 40 - 2 * 3) == 29


# The rebuilt state, row by row: a re-run row of a window ring or a compressor state is a projection (K = d_model
# <= 128 terms) of a hidden state that went through <= 4 re-run layers over other GEMM shapes; each carries fp32
# reassociation of ~sqrt(30 x 128) u32 = 3.7e-6 of the scale its reductions work at, which is the row's (its largest
# entry, O(1) after the norms), not the element's: a small entry of a row errs at the row's scale. Bound per element:
# STATE_REL x max|row|, 2.7x the model. -inf scores (empty compressor entries) must sit at the same places.
STATE_REL = 1e-5


def check_rebuilt_state(policy: str, every, seed: int = 0):
    """Rows for one policy: the loaded cache's rings, tails and entries vs the in-memory ones (per element within
    STATE_REL x its row's largest entry; asserted bit for bit where nothing is re-run), the continued logits, and the
    negative controls (re-running too few tokens: full, tails of 1 row; zero, windows of 1 entry and two windows
    instead of n_win x L = 4, whose deeper layers' windows come from inexact inputs) as 100 TOL / their departure,
    each < 1."""
    import tempfile
    from pathlib import Path
    model = build(seed=seed)
    ids = torch.randint(0, 256, (1, N + CONT), generator=torch.Generator().manual_seed(1 + seed))
    live = prefill(model, ids[:, :N])
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.dsv4prefix"
        save_prefix(model, live, path, policy, every)
        loaded = load_prefix(model, path, max_len=MAX_LEN)
        exact = recompute_start(model.cfg, policy, N, every, N) == N
        worst = (0.0, 1.0)
        for a, b in zip(live.layers, loaded.layers):
            pairs = [(a.main.t["x"], b.main.t["x"])] + [(sa.kv, sb.kv) for sa, sb in
                                                         zip(a.states.values(), b.states.values())]
            pairs += [(sa.score, sb.score) for sa, sb in zip(a.states.values(), b.states.values())]
            for x, y in pairs:
                if exact:
                    assert torch.equal(x, y), policy
                else:
                    fin = torch.isfinite(x)
                    assert torch.equal(fin, torch.isfinite(y)), policy
                    x, y = torch.where(fin, x, 0.0), torch.where(fin, y, 0.0)
                    e, t = bound_err(y, x, STATE_REL * x.abs().amax(-1, keepdim=True).clamp_min(1e-30))
                    worst = max(worst, (e, t), key=lambda r: r[0] / r[1])
            for sa, sb in ((a.comp, b.comp), (a.index, b.index)):
                if sa is not None:
                    assert torch.equal(sa.t["x"], sb.t["x"])             # stored, never re-run
        assert torch.equal(loaded.token_ids[0, :N], ids[0, :N]) and loaded.length == N
        if not exact:
            rows.append((f"prefix store {policy}: rebuilt rings, tails, entries (row scale)", *worst))
        ref = continue_logits(model, live, ids[:, N:])
        rows.append((f"prefix store {policy}: continued from the rebuilt state (rel)",
                     rel(continue_logits(model, loaded, ids[:, N:]), ref), TOL))
        real = ps.recompute_start
        for short in ([1] if policy == "full" else [1, 2 * model.cfg.window] if policy == "zero" else []):
            ps.recompute_start = lambda cfg, pol, k, ev=None, n=None: max(k - short, real(cfg, pol, k, ev, n))
            try:
                bad = continue_logits(model, load_prefix(model, path, max_len=MAX_LEN), ids[:, N:])
            finally:
                ps.recompute_start = real
            rows.append((f"prefix store {policy}: re-run of {short} too short departs (100 TOL / change)",
                         100 * TOL / rel(bad, ref), 1.0))
    return rows


@pytest.mark.parametrize("policy,every", POLICIES)
def test_state_is_rebuilt_and_too_short_a_rerun_is_caught(policy, every):
    """The loaded cache's rings, tails and entries equal the in-memory ones (to fp32 rounding; bit for bit where
    nothing is re-run); re-running too few tokens (empty window / stale tails) is caught by the decode check."""
    for what, err, tol in check_rebuilt_state(policy, every):
        assert err <= tol, (what, err, tol)


def check_greedy(seed: int = 0):
    """Greedy decoding from a loaded prefix emits the in-memory cache's tokens wherever the decision is robust:
    a token can flip only if the top-2 gap of the reference logits is at most 2 x TOL x ||logits|| (the loaded
    logits differ by at most TOL x ||logits|| in norm, a row asserted at every step, hence in any entry); the runs
    are compared up to the first step that is not robust (after it they may legitimately differ).
    -> (rows, number of robust steps compared)."""
    import tempfile
    from pathlib import Path
    model = build(seed=seed)
    ids = torch.randint(0, 256, (1, N), generator=torch.Generator().manual_seed(2 + seed))
    live = prefill(model, ids)
    compared, worst = 0, 0.0
    with tempfile.TemporaryDirectory() as d:
        for policy, every in POLICIES:
            path = Path(d) / "p"
            save_prefix(model, live, path, policy, every)
            for k in (37,):
                caches = [prefill(model, ids[:, :k]), load_prefix(model, path, n_tokens=k, max_len=MAX_LEN)]
                toks = [torch.zeros(1, 1, dtype=torch.long)] * 2          # a fixed first continuation token
                for _ in range(10):
                    with torch.no_grad():
                        logits = [model(t, cache=c).logits[0, -1] for t, c in zip(toks, caches)]
                    worst = max(worst, rel(logits[1], logits[0]))
                    top2 = logits[0].topk(2).values
                    if top2[0] - top2[1] <= 2 * TOL * logits[0].norm():
                        break
                    toks = [lg.argmax().view(1, 1) for lg in logits]
                    assert toks[0].item() == toks[1].item(), (policy, k)
                    compared += 1
    return [("prefix store greedy: loaded logits per step (rel)", worst, TOL)], compared


def test_greedy_tokens_match():
    rows, compared = check_greedy()
    for what, err, tol in rows:
        assert err <= tol, (what, err, tol)
    print("greedy steps compared:", compared)
    assert compared >= 15, compared


def check_row_of_batch(seed: int = 0):
    """save_prefix(row=1) of a 2-sequence cache, loaded for 3 requests: each row's continued logits vs sequence 1's
    own cache (rel)."""
    import tempfile
    from pathlib import Path
    model = build(seed=seed)
    ids = torch.randint(0, 256, (2, N + CONT), generator=torch.Generator().manual_seed(6 + seed))
    live = model.new_cache(2, MAX_LEN)
    with torch.no_grad():
        model(ids[:, :N], cache=live)
    with tempfile.TemporaryDirectory() as d:
        save_prefix(model, live, Path(d) / "p", "zero", row=1)
        loaded = load_prefix(model, Path(d) / "p", batch_size=3, n_tokens=37, max_len=MAX_LEN)
    ref = continue_logits(model, prefill(model, ids[1:, :37]), ids[1:, 37:37 + CONT])
    cont = ids[1:, 37:37 + CONT].expand(3, -1)
    with torch.no_grad():
        got = torch.stack([model(cont[:, t:t + 1], cache=loaded).logits[:, 0] for t in range(CONT)], 1)
    return [("prefix store row of a batch: continued logits (rel)", max(rel(got[b], ref) for b in range(3)), TOL)]


def test_row_of_a_batch_saved_and_loaded_into_a_batch():
    for what, err, tol in check_row_of_batch():
        assert err <= tol, (what, err, tol)


# ----------------------------------------------------------------------------------------------- bytes on disk

@pytest.mark.parametrize("storage", ["fp32", "bf16", "paper"])
def test_bytes_on_disk_are_predicted_exactly(storage, tmp_path):
    model = build()
    ids = torch.randint(0, 256, (1, N), generator=torch.Generator().manual_seed(3))
    for n in (0, 7, N):
        live = prefill(model, ids[:, :n], storage)
        for policy, every in POLICIES + (("checkpoint", 5),):
            path = tmp_path / f"{policy}{n}"
            written = save_prefix(model, live, path, policy, every)
            assert path.stat().st_size == written == prefix_store_bytes(model.cfg, n, policy, every, storage)
    dense = build(layer_types=["dense", "swa"])
    live = prefill(dense, ids, storage)
    assert save_prefix(dense, live, tmp_path / "d", "full") == prefix_store_bytes(dense.cfg, N, "full", None, storage)


def test_paper_storage_checkpoint_reloads_bit_for_bit(tmp_path):
    model = build()
    ids = torch.randint(0, 256, (1, N + CONT), generator=torch.Generator().manual_seed(4))
    live = prefill(model, ids[:, :N], "paper")
    save_prefix(model, live, tmp_path / "p", "checkpoint", 16)
    loaded = load_prefix(model, tmp_path / "p", max_len=MAX_LEN)
    assert torch.equal(continue_logits(model, loaded, ids[:, N:]), continue_logits(model, live, ids[:, N:]))


def test_flash_pro_curves():
    """Analytic bytes at the paper's shapes (storage "paper"): zero < checkpoint < full; full - zero is exactly one
    window entry per token per layer plus the longer header; the window part is several times the compressed one."""
    from dsv4_lab.accounting import entry_bytes, resolve
    for name in ("v4-flash", "v4-pro"):
        cfg, n = resolve(name), 2 ** 16
        zero, ckpt, full = (prefix_store_bytes(name, n, p, e) for p, e in (("zero", None), ("checkpoint", 4096),
                                                                          ("full", None)))
        assert zero < ckpt < full
        E = entry_bytes(cfg, "paper")[0]
        window_part = n * cfg.n_layers * E
        assert 0 < full - zero - window_part < 3 * 80 * cfg.n_layers   # the rest: 3 header table entries a layer
        assert window_part > 5 * (zero - 4 * n)                         # SWA ~7-8x the compressed volume
        assert prefix_store_bytes(name, 2 * n, "zero") > zero


# ----------------------------------------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    path = tmp_path_factory.mktemp("prefix") / "good.dsv4prefix"
    save_prefix(model, prefill(model, ids), path, "checkpoint", 8)
    return model, path, path.read_bytes()


def rewrite_header(data: bytes, **changes) -> bytes:
    p = len(ps.MAGIC) + 8
    (hl,) = struct.unpack("<Q", data[len(ps.MAGIC):p])
    h = json.loads(data[p:p + hl])
    h.update(changes)
    new = json.dumps(h).encode()
    return ps.MAGIC + struct.pack("<Q", len(new)) + new + data[p + hl:]


@pytest.mark.parametrize("case,match", [
    ("truncated", "truncated"), ("truncated-header", "truncated"), ("flipped-byte", "sha256"),
    ("version", "format version 2"), ("not-prefix", "not a dsv4-lab prefix"), ("header-json", "damaged header"),
    ("table", "damaged header"), ("missing", "cannot be read")])
def test_bad_files_give_one_clear_error(saved, case, match, tmp_path):
    model, good, data = saved
    bad = {"truncated": data[:-7], "truncated-header": data[:30],
           "flipped-byte": data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
           "version": rewrite_header(data, version=2), "not-prefix": b"PK\x03\x04" + data[4:],
           "header-json": data[:len(ps.MAGIC) + 8] + b"[" + data[len(ps.MAGIC) + 9:],
           "table": rewrite_header(data, n_tokens=19)}.get(case)
    path = tmp_path / "bad.dsv4prefix"
    if bad is not None:
        path.write_bytes(bad)
    with pytest.raises(PrefixStoreError, match=match) as e:
        load_prefix(model, path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_other_model_or_weights_are_refused(saved):
    model, path, _ = saved
    with pytest.raises(PrefixStoreError, match="another model config"):
        load_prefix(build(window=4), path)
    with pytest.raises(PrefixStoreError, match="other weights"):
        load_prefix(build(seed=1), path)


def test_bad_arguments_write_nothing(saved, tmp_path, monkeypatch):
    model, good, data = saved
    live = prefill(model, torch.randint(0, 256, (1, 9)))
    for kw, match in [(dict(policy="half"), "policy"), (dict(policy="checkpoint"), "every"),
                      (dict(policy="zero", every=4), "every"), (dict(row=1), "row")]:
        with pytest.raises(PrefixStoreError, match=match):
            save_prefix(model, live, tmp_path / "x", **kw)
    dense = build(layer_types=["dense", "swa"])
    with pytest.raises(PrefixStoreError, match="layer 0 is 'dense'"):
        save_prefix(dense, prefill(dense, torch.zeros(1, 4, dtype=torch.long)), tmp_path / "x", "zero")
    assert not (tmp_path / "x").exists()
    with pytest.raises(PrefixStoreError, match="n_tokens"):
        load_prefix(model, good, n_tokens=21)
    # a save that fails while writing leaves the previous file whole (temp file + rename)
    target = tmp_path / "keep"
    target.write_bytes(data)
    from dsv4_lab import runlog

    def killed(*a):
        raise OSError("killed before the rename")
    monkeypatch.setattr(runlog.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        save_prefix(model, live, target, "zero")
    assert target.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_loader_never_unpickles():
    import inspect
    src = inspect.getsource(ps)
    assert "torch.load(" not in src and "import pickle" not in src and "weights_only" not in src
