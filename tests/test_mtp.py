"""MTP (docs §9): V3 target alignment, causality of the extra depth, SWA-only block without YaRN, shared
embedding/head, loss weight setter, off = no MTP."""
import pytest
import torch
import torch.nn.functional as F

from dsv4_lab import DSV4LM, ModelConfig
from dsv4_lab.mtp import acceptance_rate
from dsv4_lab.rope import RotaryTable
from numerics import close_err


def build(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(layer_types=["swa", "csa"], residual="mhc", mtp_depth=1, window=8, index_topk=2, vocab_size=64)
    return DSV4LM(ModelConfig.from_preset("tiny", **{**base, **kw}))


def check_mtp_ce(depth: int, seed: int = 0):
    """[(name, error, tolerance)]: MTP CE / loss recorded in aux vs recomputed (allclose atol 1e-6, rtol 1e-5)."""
    model = build(seed, mtp_depth=depth).eval()
    ids = torch.randint(0, 64, (2, 17))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    out = model(ids, targets)
    logits = model.mtp.predict(model, out.state, ids)
    assert len(logits) == depth
    ces, out_rows = [], []
    for k, lg in enumerate(logits, start=1):
        assert lg.shape == (2, 17 - k, 64)
        # logits^k at position i predicts token i+k+1
        tgt = torch.full((2, 17 - k), -100)
        for i in range(17 - k):
            if i + k + 1 < 17:
                tgt[:, i] = ids[:, i + k + 1]
        ce = F.cross_entropy(lg.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        # same logits, CE recomputed by F.cross_entropy: a mean of <= 32 terms of size ~log(64) = 4.2 in another
        # order: 32 x 4.2 x u32 = 8e-6 worst, ~1e-6 typical -> atol 1e-6 on a loss ~4 is 2.4e-7 relative (plus
        # allclose's default rtol 1e-5 x |ce| = 4e-5, which covers the worst case)
        out_rows.append((f"MTP depth {depth} ce_{k}", *close_err(out.aux[f"mtp.ce_{k}"], ce, 1e-6)))
        ces.append(ce)
    out_rows.append((f"MTP depth {depth} mtp_loss",
                     *close_err(out.aux["mtp_loss"], model.cfg.mtp_loss_weight * sum(ces) / depth, 1e-6)))
    out_rows.append((f"MTP depth {depth} loss = lm + mtp",
                     *close_err(out.loss, out.lm_loss + out.aux["mtp_loss"], 1e-6)))
    return out_rows


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_uses_v3_targets(depth):
    for what, err, tol in check_mtp_ce(depth):
        assert err <= tol, (what, err, tol)


def check_mtp_position(seed: int = 0):
    """[(name, error, tolerance)]: MTP logits at position i (predicting i + 2) change when token i + 1 changes and do
    not change for tokens after it; rows before i never change. A real dependence moves logits by O(1e-2); without
    one the changed token gets a weight of exactly 0 and only fp32 reorderings remain (kernels whose blocking sees
    the whole sequence): a few u32 of the O(1) logits, ~2e-7. The bar 1e-5 separates the two with margin: rows
    "unchanged" (< 1e-5) and "sees i + 1" (1e-5 / change, < 1)."""
    model = build(seed, layer_types=["swa", "dense"]).eval()
    ids = torch.randint(0, 64, (1, 16))
    rows = []
    with torch.no_grad():
        base = model.mtp.predict(model, model(ids).state, ids)[0]
        i = 6
        for j, expect_change in [(i + 1, True), (i + 2, False), (15, False)]:
            ids2 = ids.clone()
            ids2[0, j] = (ids[0, j] + 1) % 64
            lg = model.mtp.predict(model, model(ids2).state, ids2)[0]
            change = (lg[0, i] - base[0, i]).abs().max().item()
            if expect_change:
                rows.append(("MTP position i sees token i+1 (1e-5 / change)", 1e-5 / change, 1.0))
            else:
                rows.append(("MTP position i ignores tokens after i+1", change, 1e-5))
            rows.append(("MTP positions before i ignore tokens after i", (lg[0, :i] - base[0, :i]).abs().max().item(),
                         1e-5))
    return rows


def test_mtp_position_i_sees_tokens_up_to_i_plus_1():
    for what, err, tol in check_mtp_position():
        assert err < tol, (what, err, tol)


def test_mtp_block_is_swa_without_yarn_and_shares_embedding_and_head():
    model = build(layer_types=["csa", "hca"], ffn="moe", n_hash_layers=2, hca_ratio=8)
    blk = model.mtp.layers[0].block
    assert blk.attn.layer_type == "swa"
    ref = RotaryTable(model.cfg.rope_head_dim, model.cfg.max_seq_len, model.cfg.rope_theta)
    assert torch.equal(blk.attn.rope.cos, ref.cos)
    assert not blk.ffn.gate.is_hash                                  # score-routed (layer index L >= n_hash)
    names = [n for n, _ in model.mtp.named_parameters()]
    assert not any("embed" in n or n.startswith("head") for n in names)
    assert any(n.startswith("layers.0.hc_head.") for n in names) and "layers.0.norm.weight" in names
    ids = torch.randint(0, 64, (2, 24))
    out = model(ids, ids.roll(-1, 1))
    model.zero_grad()
    out.aux["mtp_loss"].backward()
    assert model.embed.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn_res.fn.grad.abs().sum() > 0          # MTP trains the trunk through the state


def check_loss_weight(seed: int = 0):
    model = build(seed).eval()
    ids = torch.randint(0, 64, (2, 12))
    a = model(ids, ids.roll(-1, 1)).aux["mtp_loss"]
    model.mtp.set_loss_weight(0.1)
    b = model(ids, ids.roll(-1, 1)).aux["mtp_loss"]
    # one fp32 product each: a few u32 = 2e-7 relative (allclose rtol 1e-5, default atol 1e-8)
    return [("MTP loss weight 0.3 -> 0.1", *close_err(b, a * (0.1 / 0.3), 1e-8, 1e-5))], model, ids


def test_loss_weight_setter_and_off():
    rows, model, ids = check_loss_weight()
    for what, err, tol in rows:
        assert err <= tol, (what, err, tol)
    with pytest.raises(ValueError, match="MTP loss weight"):
        model.mtp.set_loss_weight(-1)
    off = build(mtp_depth=0).eval()
    out = off(ids, ids.roll(-1, 1))
    assert off.mtp is None and "mtp_loss" not in out.aux and torch.equal(out.loss, out.lm_loss)
    # the main logits do not depend on the MTP module
    torch.manual_seed(0)
    plain = build(mtp_depth=0).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("mtp.") for k in unexpected)
    assert torch.equal(plain(ids).logits, model(ids).logits)


def test_acceptance_rate_in_range():
    model = build()
    r = acceptance_rate(model, torch.randint(0, 64, (2, 16)))
    assert 0.0 <= r <= 1.0 and model.training
