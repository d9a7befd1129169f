"""Accounting (dsv4_lab/accounting.py) against the spec's [CALC] numbers (Appendix A-C) and against itself.

Tolerances: a [CALC] value printed with k significant digits is matched to half a unit of its last digit
(e.g. 13.27B -> +-0.005B); the paper's rounded percentages (27 %, 10 %, 7 %, 2 %) to +-0.5 point, the spec's own
recomputed ratios (26.8 %, 10.5 %, ...) to +-0.05 point.
"""
import pytest

from dsv4_lab import ModelConfig
from dsv4_lab.accounting import (decode_flops, efficiency_table, entry_bytes, gqa_kv_bytes, kv_cache_bytes,
                                 layer_params, params, prefill_flops, _v4_layer_entries)

B, G, M = 1e9, 1e9, 1e6


def near(x, ref, half_unit):
    return abs(x - ref) <= half_unit * (1 + 1e-9)


# --- parameter counts derived from the shapes (docs §4, §2.8, §9, App. B/C) ---------------------------------------

@pytest.mark.parametrize("name,total,t_tol,active,a_tol,mtp,m_tol", [
    ("v4-flash", 284.3 * B, 0.05 * B, 13.27 * B, 0.005 * B, 6.6 * B, 0.05 * B),
    ("v4-pro", 1573 * B, 0.5 * B, 48.85 * B, 0.005 * B, 25.8 * B, 0.05 * B),
])
def test_v4_param_counts_match_spec_calc(name, total, t_tol, active, a_tol, mtp, m_tol):
    p = params(name)
    assert near(p["total"], total, t_tol), p["total"]
    assert near(p["active"], active, a_tol), p["active"]
    assert near(p["mtp_total"], mtp, m_tol), p["mtp_total"]
    assert near(p["total"] + p["mtp_total"], 1.60e12 if name == "v4-pro" else 290.9 * B,
                0.005e12 if name == "v4-pro" else 0.05 * B)


def test_v32_param_counts_match_paper():
    p = params("v3.2")
    assert near(p["active"], 37.5 * B, 0.05 * B)           # docs §A.2 "V3.2 37.5B" (excl. embedding)
    assert 671 * B <= p["total"] < 672 * B                   # "671B total"


@pytest.mark.parametrize("name,core,comp,idx", [("flash", 107.0, 8.4, 10.7), ("pro", 299.9, 14.7, 16.7)])
def test_per_csa_layer_params_match_spec_table(name, core, comp, idx):
    lp = layer_params(ModelConfig.from_preset(name), "csa")
    assert near(lp["attention"][0] / M, core, 0.05)
    assert near(lp["compressor"][0] / M, comp, 0.05)
    assert near(lp["indexer"][0] / M, idx, 0.05)


def _try_build(cfg):
    from dsv4_lab import DSV4LM
    return DSV4LM(cfg)


@pytest.mark.parametrize("over", [
    dict(layer_types=["dense", "swa"]),
    dict(layer_types=["swa", "dense"], q_lora_rank=0, o_groups=0, attn_sink=False, qk_norm=False),
    dict(layer_types=["csa", "hca"]),
    dict(layer_types=["csa", "swa"], compressor_overlap=False, index_n_heads=2),
    dict(layer_types=["dense"] * 2, residual="mhc"),
    dict(layer_types=["dense"] * 2, ffn="moe", n_shared_experts=1),
])
def test_analytic_params_equal_the_real_model(over):
    """The Appendix C formulas, generalised to the lab toggles, count exactly the parameters the model allocates."""
    cfg = ModelConfig.from_preset("tiny-dense", **over)
    model = _try_build(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert params(cfg)["total"] == real


# --- the headline claims at 1M context (docs §A.1, A.2) --------------------------------------------------------------

def test_flops_at_1m_reproduce_paper():
    rows = {r["model"]: r for r in efficiency_table(10**6)}
    v32, pro, flash = rows["v3.2"], rows["v4-pro"], rows["v4-flash"]
    # the paper's claims (abstract): Pro 27 %, Flash 10 % of V3.2's single-token FLOPs
    assert near(pro["flops_ratio"], 0.27, 0.005)
    assert near(flash["flops_ratio"], 0.10, 0.005)
    # the spec's recomputation: 26.8 % / 10.0 %, plain FLOPs 26.5 % / 12.2 %
    assert near(pro["flops_ratio"], 0.268, 0.0005) and near(flash["flops_ratio"], 0.100, 0.0005)
    assert near(pro["flops_ratio_plain"], 0.265, 0.0005) and near(flash["flops_ratio_plain"], 0.122, 0.0005)
    # the spec's breakdown table (G FP8-eq. FLOPs, printed to 1 G)
    for r, (dense, core, idx, tot) in [(v32, (75, 70, 999, 1144)), (pro, (98, 147, 61, 306)),
                                       (flash, (27, 45, 43, 115))]:
        assert near(r["flops_dense"] / G, dense, 0.5)
        assert near(r["flops_core_attn"] / G, core, 0.5)
        assert near(r["flops_indexer"] / G, idx, 0.5)
        assert near(r["flops_fp8_equiv"] / G, tot, 0.5)


def test_kv_cache_at_1m_reproduces_paper():
    rows = {r["model"]: r for r in efficiency_table(10**6)}
    assert near(rows["v3.2"]["kv_bytes"] / G, 48.1, 0.05)
    assert near(rows["v4-pro"]["kv_bytes"] / G, 5.03, 0.005)
    assert near(rows["v4-flash"]["kv_bytes"] / G, 3.51, 0.005)
    assert near(rows["v4-pro"]["kv_ratio"], 0.10, 0.005) and near(rows["v4-flash"]["kv_ratio"], 0.07, 0.005)
    assert near(rows["v4-pro"]["kv_ratio"], 0.105, 0.0005) and near(rows["v4-flash"]["kv_ratio"], 0.073, 0.0005)
    for name in ("v4-pro", "v4-flash"):                       # ~2 % of BF16 GQA-8 (head dim 128), same depth
        assert near(rows[name]["kv_ratio_gqa8"], 0.020, 0.0005)


@pytest.mark.parametrize("n,pro,flash", [(32 * 1024, 0.70, 0.19), (128 * 1024, 0.52, 0.15)])
def test_flops_ratio_at_other_lengths(n, pro, flash):
    assert near(decode_flops("v4-pro", n) / decode_flops("v3.2", n), pro, 0.005)
    assert near(decode_flops("v4-flash", n) / decode_flops("v3.2", n), flash, 0.005)


def test_entry_bytes_and_gqa_baseline():
    assert entry_bytes(ModelConfig.from_preset("flash")) == (583, 68)             # docs §6.3
    assert entry_bytes(ModelConfig.from_preset("flash"), "bf16") == (1024, 256)
    assert gqa_kv_bytes(1, 1) == 2 * 8 * 128 * 2


def test_swa_is_about_8x_compressed_volume_pro():
    """docs §A.2 sanity check: Pro's per-token SWA bytes ~7.9x its compressed main-entry bytes (§3.5.2)."""
    swa = 61 * 583
    comp = 30 * 583 / 4 + 31 * 583 / 128
    assert near(swa / comp, 7.9, 0.05)
    n = 10**6
    kv = kv_cache_bytes("v4-pro", n, breakdown=True)
    assert near(kv["main"], 61 * 128 * 583 + 30 * (n // 4) * 583 + 31 * (n // 128) * 583, 0)


# --- self-consistency ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over", [dict(layer_types=["dense", "swa", "csa", "hca"], index_topk=3),
                                  dict(layer_types=["csa", "hca"], window_branch=False, index_mode="all"),
                                  dict(layer_types="flash:6", ffn="moe", residual="mhc")])
@pytest.mark.parametrize("weighting", ["plain", "fp8_equiv"])
def test_prefill_is_sum_of_decode(over, weighting):
    """The closed-form causal sums equal the brute-force sum of per-token decode FLOPs."""
    cfg = ModelConfig.from_preset("tiny-dense", **over)
    for n in (1, 3, 4, 17, 64, 200):
        brute = sum(decode_flops(cfg, t, weighting) for t in range(1, n + 1))
        assert abs(prefill_flops(cfg, n, weighting) - brute) <= 1e-9 * brute


def test_core_attention_entries_match_masks():
    """The K(n) used for the core attention equals the number of entries the masks of docs §2.5 admit."""
    cfg = ModelConfig.from_preset("tiny-dense", layer_types=["dense", "swa", "csa", "hca"], window=8, csa_ratio=4,
                                  hca_ratio=8, index_topk=3)
    for n in range(1, 60):
        t = n - 1                                                   # 0-based position of the decoded token
        win = sum(1 for j in range(t + 1) if j > t - cfg.window)
        assert _v4_layer_entries(cfg, "dense", n) == (n, 0)
        assert _v4_layer_entries(cfg, "swa", n) == (win, 0)
        vis4 = sum(1 for s in range(n) if s < (t + 1) // 4)         # s < floor((t+1)/m)
        assert _v4_layer_entries(cfg, "csa", n) == (win + min(3, vis4), vis4)
        vis8 = sum(1 for s in range(n) if s < (t + 1) // 8)
        assert _v4_layer_entries(cfg, "hca", n) == (win + vis8, 0)


def test_weighting_changes_only_the_weights():
    cfg = ModelConfig.from_preset("flash")
    a = decode_flops(cfg, 10**5, "plain", breakdown=True)
    b = decode_flops(cfg, 10**5, "fp8_equiv", breakdown=True)
    assert b["dense"] == a["dense"] and b["core_attn"] == 2 * a["core_attn"] and b["indexer"] == 0.5 * a["indexer"]
    with pytest.raises(ValueError, match="weighting"):
        decode_flops(cfg, 10, "fp16")
    with pytest.raises(ValueError, match="storage"):
        kv_cache_bytes(cfg, 10, "int3")
    with pytest.raises(ValueError, match="model"):
        decode_flops("v5", 10)


def test_kv_grows_as_spec_says():
    cfg = ModelConfig.from_preset("tiny-dense", layer_types=["swa", "csa", "hca", "dense"], window=16, csa_ratio=4,
                                  hca_ratio=16)
    E, EI = entry_bytes(cfg, "fp32")
    kv = lambda n: kv_cache_bytes(cfg, n, "fp32")
    # one more block of 16 tokens: dense +16 E, csa +4 (E + EI), hca +1 E, swa +0
    assert kv(64) - kv(48) == 16 * E + 4 * (E + EI) + 1 * E
    assert kv(64, ) - kv(63) == E + (E + EI) + E                      # 64 completes a CSA and an HCA block
    st = kv_cache_bytes(cfg, 64, "fp32", include_state=True, breakdown=True)["state"]
    assert st == 2 * 8 * 64 * 4 + 2 * 8 * 32 * 4 + 2 * 16 * 32 * 4    # CSA main + CSA indexer + HCA states


def test_plot_efficiency_writes_figures_and_data(tmp_path):
    from dsv4_lab.figures.efficiency import plot_efficiency
    made = plot_efficiency(tmp_path, measure=False)
    names = {p.name for p in made}
    assert {"efficiency_paper.png", "efficiency_paper.csv", "efficiency_lab.png", "efficiency_lab.csv",
            "efficiency.json"} <= names
    import json
    info = json.loads((tmp_path / "efficiency.json").read_text())
    pro = [r for r in info["table_1M"] if r["model"] == "v4-pro"][0]
    assert abs(pro["flops_ratio"] - 0.268) < 5e-4
