"""FLOPs and KV-cache accounting: per decoded token, per prefilled sequence, and cache bytes (docs §A, §B, §C).

    decode_flops("v4-pro", 10**6) / decode_flops("v3.2", 10**6)          # 0.268  (paper: 27 %)
    kv_cache_bytes("v4-flash", 10**6) / kv_cache_bytes("v3.2", 10**6)    # 0.073  (paper: 7 %)
    decode_flops(ModelConfig.from_preset("tiny", layer_types="flash:4"), 512, breakdown=True)

`model` is a `ModelConfig` (any preset, any toggles) or a name: "v3.2" (Appendix B shapes), "v4-flash" / "v4-pro"
(= the "flash" / "pro" presets, docs §4), or any preset name. Nothing here instantiates a model.

Accounting model (docs §A.2, a [CALC] reconstruction that reproduces every headline number):
* Dense part = every weight matrix touched by one token (attention projections, compressors, indexer projections,
  mHC mixing, gate, shared + activated routed experts, head): 2 FLOPs per active parameter. Active parameters are
  derived from the shapes with the Appendix C formulas (`params`), never hard-coded.
* Core attention per layer at context n: 2 * n_h * K(n) * (c + c)  (QK^T and PV over K entries; V4: K = shared K=V
  entries of the window plus the selected / all visible compressed entries; V3.2: MLA in absorbed mode, 576 + 512).
* Indexer per CSA layer: 2 * n_h^I * c^I * floor(n/m) (V4, over compressed keys); V3.2: 2 * 64 * 128 * n.
* Weighting: "fp8_equiv" = equivalent FP8 FLOPs, BF16 x2, FP8 x1, FP4 x0.5 (docs §A.2, paper §1 "measured in
  equivalent FP8 FLOPs"); the dense part counts as FP8 (FP4 x FP8 expert GEMMs run at FP8 peak, paper §1), the core
  attention as BF16, the V4 indexer QK path as FP4 and V3.2's as FP8. "plain" = every FLOP x1.
* Not counted (all O(d) or O(c) per token, < 0.1 % at paper shapes): norms, RoPE, softmax / sink, the compressors'
  per-channel softmax pooling, mHC Sinkhorn and mixing, routing top-k, indexer top-k and ReLU/weighting.
* KV bytes per layer (docs §A.2 / §6.3): SWA-only window*E; CSA window*E + floor(n/m)(E + E_I); HCA
  window*E + floor(n/m')E; lab "dense" layers n*E. "paper" storage: E = (c - r) FP8 + 2r BF16 + one UE8M0 byte per
  64 FP8 values (= 583 B at c=512, r=64), E_I = c^I/2 (MXFP4) + one UE8M0 byte per 32 (= 68 B). V3.2: n(656 + 132).
  The per-request compressor states (fp32 (kv, score) rows, §6.1) are excluded unless include_state=True.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig

WEIGHTINGS = {
    "fp8_equiv": {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5},     # docs §A.2
    "plain": {"bf16": 1.0, "fp8": 1.0, "fp4": 1.0},
}
STORAGES = ("paper", "bf16", "fp32")


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V3.2 baseline shapes (docs §B) — MLA, not expressible as a ModelConfig
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class V32Shapes:
    n_layers: int = 61
    d_model: int = 7168
    n_heads: int = 128
    vocab_size: int = 129280
    n_dense_layers: int = 3            # first 3 layers dense FFN
    dense_inter: int = 18432
    n_routed_experts: int = 256
    n_activated_experts: int = 8
    n_shared_experts: int = 1
    moe_inter_dim: int = 2048
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_dim: int = 128
    qk_rope_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048             # tokens, not blocks
    kv_entry_bytes: int = 656          # FlashMLA FP8 latent: 512 FP8 + 4 fp32 scales + 64 BF16 RoPE (docs §A.2)
    index_key_bytes: int = 132         # FP8 indexer key (128) + fp32 scale


V32 = V32Shapes()
_PRESET_CACHE: dict[str, ModelConfig] = {}
NAMES = {"v3.2": V32, "v32": V32, "v4-flash": "flash", "v4-pro": "pro"}


def resolve(model):
    """A name ("v3.2", "v4-flash", "v4-pro", any preset) or a ModelConfig -> ModelConfig or V32Shapes."""
    if isinstance(model, (ModelConfig, V32Shapes)):
        return model
    if isinstance(model, str):
        key = model.lower()
        target = NAMES.get(key, key)
        if isinstance(target, V32Shapes):
            return target
        if target not in _PRESET_CACHE:                     # building a ModelConfig validates it (slow-ish)
            try:
                _PRESET_CACHE[target] = ModelConfig.from_preset(target)
            except Exception:
                raise ValueError(f"model {model!r} is not allowed: a ModelConfig or one of "
                                 f"{sorted(NAMES)} or a preset name") from None
        return _PRESET_CACHE[target]
    raise ValueError(f"model {model!r} is not allowed: a ModelConfig, V32Shapes or a name")


def label(model) -> str:
    m = resolve(model)
    if isinstance(m, V32Shapes):
        return "V3.2"
    return {"flash": "V4-Flash", "pro": "V4-Pro"}.get(_preset_of(m), "lab")


def _preset_of(cfg: ModelConfig) -> str | None:
    for name in ("flash", "pro"):
        if cfg == resolve(name):
            return name
    return None


# ---------------------------------------------------------------------------------------------------------------
# Parameters (docs §C, generalised to the lab toggles)
# ---------------------------------------------------------------------------------------------------------------

def _attention_params(cfg: ModelConfig) -> int:
    """Core attention of any layer type: n_h + d d_c + d_c + d_c n_h c + d c + c + d_g n_h c + g d_g d (App. C)."""
    d, H, c = cfg.d_model, cfg.n_heads, cfg.head_dim
    n = H if cfg.attn_sink else 0
    n += d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * c if cfg.q_lora_rank > 0 else d * H * c
    n += d * c + (c if cfg.qk_norm else 0)
    if cfg.o_groups > 0:
        n += cfg.o_lora_rank * H * c + cfg.o_groups * cfg.o_lora_rank * d
    else:
        n += H * c * d
    return n


def _compressor_params(d: int, c: int, m: int, overlap: bool) -> int:
    """m*2c + 2*d*2c + c with overlap (CSA, docs §2.3); m*c + 2*d*c + c without (HCA, docs §3)."""
    w = 2 * c if overlap else c
    return m * w + 2 * d * w + c


def _indexer_params(cfg: ModelConfig) -> int:
    """d_c * H_I * c_I (wq_b on the shared latent) + H_I * d (weights_proj) + own compressor (docs §2.4)."""
    HI, cI, d = cfg.index_n_heads, cfg.index_head_dim, cfg.d_model
    latent = cfg.q_lora_rank if cfg.q_lora_rank > 0 else d
    return latent * HI * cI + HI * d + _compressor_params(d, cI, cfg.csa_ratio, cfg.compressor_overlap)


def _mhc_params(cfg: ModelConfig) -> int:
    """Two sites per block: W (n(2+n), n d), S (n(2+n)), alpha (3)  (docs §1.3); 0 for the plain residual."""
    if cfg.residual == "plain":
        return 0
    n = cfg.hc_mult
    return 2 * ((2 + n) * n * n * cfg.d_model + (2 + n) * n + 3)


def _hc_head_params(cfg: ModelConfig) -> int:
    if cfg.residual == "plain":
        return 0
    n = cfg.hc_mult
    return n * n * cfg.d_model + n + 1


def _ffn_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active): dense SwiGLU 3 d d_ff; MoE N_r d + N_r + (N_r + n_s) 3 d I, active N_r d + (K_r + n_s) 3 d I."""
    d = cfg.d_model
    if cfg.ffn == "dense":
        n = 3 * d * cfg.d_ff
        return n, n
    Nr, Kr, ns, inter = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_shared_experts, cfg.moe_inter_dim
    return Nr * d + Nr + (Nr + ns) * 3 * d * inter, Nr * d + (Kr + ns) * 3 * d * inter


def layer_params(cfg: ModelConfig, layer_type: str) -> dict[str, tuple[int, int]]:
    """{group: (total, active)} for one block of the given type (docs §C)."""
    attn = _attention_params(cfg)
    out = {"attention": (attn, attn)}
    if layer_type == "csa":
        comp = _compressor_params(cfg.d_model, cfg.head_dim, cfg.csa_ratio, cfg.compressor_overlap)
        idx = _indexer_params(cfg)
        out["compressor"], out["indexer"] = (comp, comp), (idx, idx)
    elif layer_type == "hca":
        comp = _compressor_params(cfg.d_model, cfg.head_dim, cfg.hca_ratio, False)
        out["compressor"] = (comp, comp)
    mhc = _mhc_params(cfg)
    out["mhc"] = (mhc, mhc)
    out["norms"] = (2 * cfg.d_model, 2 * cfg.d_model)
    out["ffn"] = _ffn_params(cfg)
    return out


def _v32_layer_params(s: V32Shapes, dense_ffn: bool) -> dict[str, tuple[int, int]]:
    d, H = s.d_model, s.n_heads
    qk = s.qk_nope_dim + s.qk_rope_dim
    mla = (d * s.q_lora_rank + s.q_lora_rank + s.q_lora_rank * H * qk            # wq_a, q_norm, wq_b
           + d * (s.kv_lora_rank + s.qk_rope_dim) + s.kv_lora_rank               # wkv_a, kv_norm
           + s.kv_lora_rank * H * (s.qk_nope_dim + s.v_head_dim)                 # wkv_b
           + H * s.v_head_dim * d)                                               # wo
    HI, cI = s.index_n_heads, s.index_head_dim
    idx = s.q_lora_rank * HI * cI + d * cI + 2 * cI + d * HI                     # wq_b, wk, LayerNorm, weights_proj
    if dense_ffn:
        ffn = (3 * d * s.dense_inter,) * 2
    else:
        Nr, Kr, ns, inter = s.n_routed_experts, s.n_activated_experts, s.n_shared_experts, s.moe_inter_dim
        ffn = (Nr * d + Nr + (Nr + ns) * 3 * d * inter, Nr * d + (Kr + ns) * 3 * d * inter)
    return {"attention": (mla, mla), "indexer": (idx, idx), "norms": (2 * d, 2 * d), "ffn": ffn}


def params(model, include_mtp: bool = False) -> dict:
    """Parameter counts from the shapes. Returns {"total", "active", "embedding", "mtp_total", "mtp_active",
    "groups": {group: {"total", "active"}}}. "active" = parameters touched by one token, excluding the embedding
    (the convention of docs §4: Flash 13.3B, Pro 48.9B, V3.2 37.5B); "total" includes embedding and head.
    include_mtp adds the MTP module(s) to total and active."""
    m = resolve(model)
    groups: dict[str, list[int]] = {}

    def add(layer: dict):
        for k, (t, a) in layer.items():
            g = groups.setdefault(k, [0, 0])
            g[0] += t
            g[1] += a

    if isinstance(m, V32Shapes):
        for i in range(m.n_layers):
            add(_v32_layer_params(m, i < m.n_dense_layers))
        d, V = m.d_model, m.vocab_size
        add({"head": (V * d + d, V * d + d)})
        emb, mtp_t, mtp_a = V * d, 0, 0
    else:
        for t in m.layer_types:
            add(layer_params(m, t))
        d, V = m.d_model, m.vocab_size
        hh = _hc_head_params(m)
        add({"head": (V * d + d + hh, V * d + d + hh)})                      # head, final norm, hc_head
        emb = V * d
        # MTP (docs §9, App. C): one SWA-only block with a score-routed MoE + e_proj/h_proj + enorm/hnorm/norm + hc_head
        blk = layer_params(m, "swa")
        blk_t = sum(t for t, _ in blk.values()) + 2 * d * d + 3 * d + hh
        blk_a = sum(a for _, a in blk.values()) + 2 * d * d + 3 * d + hh
        mtp_t, mtp_a = m.mtp_depth * blk_t, m.mtp_depth * blk_a
        if include_mtp and mtp_t:
            add({"mtp": (mtp_t, mtp_a)})
    total = sum(t for t, _ in groups.values()) + emb
    active = sum(a for _, a in groups.values())
    return {"total": total, "active": active, "embedding": emb, "mtp_total": mtp_t, "mtp_active": mtp_a,
            "groups": {k: {"total": t, "active": a} for k, (t, a) in groups.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Per-token attention work at context n (n = number of tokens visible to the decoded token, itself included)
# ---------------------------------------------------------------------------------------------------------------

def _v4_layer_entries(cfg: ModelConfig, layer_type: str, n: int) -> tuple[int, int]:
    """(K = entries attended by the core attention, indexer keys scored) for one V4 / lab layer at context n."""
    if layer_type == "dense":
        return n, 0
    win = min(cfg.window, n)
    if layer_type == "swa":
        return win, 0
    if not cfg.window_branch:
        win = 0
    if layer_type == "csa":
        s = n // cfg.csa_ratio
        k = s if cfg.index_mode == "all" else min(cfg.index_topk, s)
        return win + k, s
    if layer_type == "hca":
        return win + n // cfg.hca_ratio, 0
    raise ValueError(f"layer type {layer_type!r} is not allowed: one of dense, swa, csa, hca")


# closed-form causal sums over t = 1..n (prefill = sum of per-token decode work)
def _sum_min(a: int, n: int) -> int:
    """sum_{t=1}^{n} min(a, t)."""
    return n * (n + 1) // 2 if n <= a else a * (a + 1) // 2 + a * (n - a)


def _sum_floor(m: int, n: int) -> int:
    """sum_{t=1}^{n} floor(t / m)."""
    q, r = divmod(n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def _sum_min_floor(k: int, m: int, n: int) -> int:
    """sum_{t=1}^{n} min(k, floor(t / m))."""
    if n < k * m:
        return _sum_floor(m, n)
    return _sum_floor(m, k * m - 1) + k * (n - k * m + 1)


def _v4_layer_entries_sum(cfg: ModelConfig, layer_type: str, n: int) -> tuple[int, int]:
    """Sums over t = 1..n of `_v4_layer_entries` (closed form, O(1))."""
    if layer_type == "dense":
        return n * (n + 1) // 2, 0
    win = _sum_min(cfg.window, n)
    if layer_type == "swa":
        return win, 0
    if not cfg.window_branch:
        win = 0
    if layer_type == "csa":
        s = _sum_floor(cfg.csa_ratio, n)
        k = s if cfg.index_mode == "all" else _sum_min_floor(cfg.index_topk, cfg.csa_ratio, n)
        return win + k, s
    if layer_type == "hca":
        return win + _sum_floor(cfg.hca_ratio, n), 0
    raise ValueError(f"layer type {layer_type!r} is not allowed: one of dense, swa, csa, hca")


def _flops(m, n: int, weighting: str, prefill: bool) -> dict:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not allowed: one of {sorted(WEIGHTINGS)}")
    if n < 1:
        raise ValueError(f"context_len {n!r} is not allowed: a positive integer")
    w = WEIGHTINGS[weighting]
    tokens = n if prefill else 1
    p = params(m)
    groups = {k: 2 * v["active"] * tokens for k, v in p["groups"].items()}     # dense part: 2 FLOPs / parameter
    dense = sum(groups.values())
    if isinstance(m, V32Shapes):
        K = _sum_min(m.index_topk, n) if prefill else min(m.index_topk, n)
        S = n * (n + 1) // 2 if prefill else n
        core = m.n_layers * 2 * m.n_heads * K * (m.kv_lora_rank + m.qk_rope_dim + m.kv_lora_rank)
        idx = m.n_layers * 2 * m.index_n_heads * m.index_head_dim * S
        idx_prec = "fp8"
    else:
        core = idx = 0
        for t in m.layer_types:
            K, S = (_v4_layer_entries_sum if prefill else _v4_layer_entries)(m, t, n)
            core += 2 * m.n_heads * K * (m.head_dim + m.head_dim)
            idx += 2 * m.index_n_heads * m.index_head_dim * S
        idx_prec = "fp4"
    out = {"dense": dense * w["fp8"], "core_attn": core * w["bf16"], "indexer": idx * w[idx_prec]}
    out["total"] = out["dense"] + out["core_attn"] + out["indexer"]
    out["dense_groups"] = {k: v * w["fp8"] for k, v in groups.items()}
    out["weighting"] = weighting
    return out


def decode_flops(model, context_len: int, weighting: str = "fp8_equiv", breakdown: bool = False):
    """FLOPs to decode one token whose context (itself included) has context_len tokens.

    weighting: "fp8_equiv" (docs §A.2: BF16 x2, FP8 x1, FP4 x0.5; the paper's unit) or "plain".
    breakdown=True returns {"dense", "core_attn", "indexer", "total", "dense_groups", "weighting"}."""
    out = _flops(resolve(model), int(context_len), weighting, prefill=False)
    return out if breakdown else out["total"]


def prefill_flops(model, n: int, weighting: str = "plain", breakdown: bool = False):
    """Forward FLOPs of one causal sequence of n tokens = the sum of decode_flops over contexts 1..n (closed form).

    Default weighting "plain" (training compute); the head is applied to every position (training / scoring)."""
    out = _flops(resolve(model), int(n), weighting, prefill=True)
    return out if breakdown else out["total"]


# ---------------------------------------------------------------------------------------------------------------
# KV cache bytes (docs §6, A.2)
# ---------------------------------------------------------------------------------------------------------------

def entry_bytes(cfg: ModelConfig, storage: str = "paper") -> tuple[int, int]:
    """(E, E_I): bytes of one main KV entry and of one indexer key (docs §6.3).

    paper: (c - r) FP8 E4M3 + one UE8M0 byte per 64 of them + r BF16; indexer c^I/2 (packed E2M1) + one UE8M0
    byte per 32.  bf16 / fp32: every dim at 2 / 4 bytes."""
    c, r, cI = cfg.head_dim, cfg.rope_head_dim, cfg.index_head_dim
    if storage == "paper":
        return (c - r) + math.ceil((c - r) / 64) + 2 * r, math.ceil(cI / 2) + math.ceil(cI / 32)
    if storage in ("bf16", "fp32"):
        b = 2 if storage == "bf16" else 4
        return b * c, b * cI
    raise ValueError(f"storage {storage!r} is not allowed: one of {STORAGES}")


def state_bytes(cfg: ModelConfig, layer_type: str) -> int:
    """Per-request compressor state of one layer: fp32 (kv, score) rows (docs §6.1); CSA overlap: 2m rows x 2c
    channels, plus the indexer's 2m x 2c^I; HCA: m' x c."""
    def comp(m, c, overlap):
        rows, ch = (2 * m, 2 * c) if overlap else (m, c)
        return 2 * rows * ch * 4
    if layer_type == "csa":
        return comp(cfg.csa_ratio, cfg.head_dim, cfg.compressor_overlap) + \
            comp(cfg.csa_ratio, cfg.index_head_dim, cfg.compressor_overlap)
    if layer_type == "hca":
        return comp(cfg.hca_ratio, cfg.head_dim, False)
    return 0


def layer_kv_entries(cfg: ModelConfig, layer_type: str, n: int) -> tuple[int, int]:
    """(main entries, indexer keys) held for one layer at context n: window ring (allocated in full, `window`),
    plus floor(n/m) compressed entries (CSA, with as many indexer keys) or floor(n/m') (HCA); "dense": n."""
    if layer_type == "dense":
        return n, 0
    if layer_type == "swa":
        return cfg.window, 0
    if layer_type == "csa":
        s = n // cfg.csa_ratio
        return cfg.window + s, s
    if layer_type == "hca":
        return cfg.window + n // cfg.hca_ratio, 0
    raise ValueError(f"layer type {layer_type!r} is not allowed: one of dense, swa, csa, hca")


def kv_cache_bytes(model, context_len: int, storage: str = "paper", include_state: bool = False,
                   breakdown: bool = False):
    """Bytes of one sequence's KV cache at context_len (all layers; MTP excluded).

    storage: "paper" (V4 FP8 + BF16-RoPE entries, MXFP4 indexer keys; V3.2 FlashMLA FP8 latent + FP8 indexer keys),
    "bf16" or "fp32" (every cached value at 2 / 4 bytes). include_state adds the per-request compressor states."""
    m, n = resolve(model), int(context_len)
    if isinstance(m, V32Shapes):
        if storage == "paper":
            e, ei = m.kv_entry_bytes, m.index_key_bytes
        elif storage in ("bf16", "fp32"):
            b = 2 if storage == "bf16" else 4
            e, ei = b * (m.kv_lora_rank + m.qk_rope_dim), b * m.index_head_dim
        else:
            raise ValueError(f"storage {storage!r} is not allowed: one of {STORAGES}")
        out = {"main": m.n_layers * n * e, "indexer": m.n_layers * n * ei, "state": 0}
    else:
        E, EI = entry_bytes(m, storage)
        out = {"main": 0, "indexer": 0, "state": 0}
        for t in m.layer_types:
            ne, ni = layer_kv_entries(m, t, n)
            out["main"] += ne * E
            out["indexer"] += ni * EI
            out["state"] += state_bytes(m, t) if include_state else 0
    out["total"] = out["main"] + out["indexer"] + out["state"]
    return out if breakdown else out["total"]


def gqa_kv_bytes(context_len: int, n_layers: int, n_kv_heads: int = 8, head_dim: int = 128,
                 bytes_per_value: int = 2) -> int:
    """The paper's baseline (docs §A.1): BF16 GQA with 8 KV heads of dim 128, K and V cached, same depth."""
    return 2 * n_kv_heads * head_dim * bytes_per_value * int(context_len) * n_layers


def n_layers(model) -> int:
    m = resolve(model)
    return m.n_layers


# ---------------------------------------------------------------------------------------------------------------
# The headline table (docs §A.2)
# ---------------------------------------------------------------------------------------------------------------

def efficiency_table(context_len: int = 10**6, models=("v3.2", "v4-pro", "v4-flash"),
                     baseline: str = "v3.2") -> list[dict]:
    """One row per model: FLOPs per token (fp8-eq. and plain, with breakdown), KV bytes, ratios vs the baseline and
    vs BF16 GQA-8 of the same depth."""
    base_f = decode_flops(baseline, context_len)
    base_fp = decode_flops(baseline, context_len, "plain")
    base_kv = kv_cache_bytes(baseline, context_len)
    rows = []
    for name in models:
        f = decode_flops(name, context_len, breakdown=True)
        fp = decode_flops(name, context_len, "plain")
        kv = kv_cache_bytes(name, context_len)
        gqa = gqa_kv_bytes(context_len, n_layers(name))
        rows.append({"model": name, "context_len": context_len, "active_params": params(name)["active"],
                     "flops_dense": f["dense"], "flops_core_attn": f["core_attn"], "flops_indexer": f["indexer"],
                     "flops_fp8_equiv": f["total"], "flops_plain": fp,
                     "flops_ratio": f["total"] / base_f, "flops_ratio_plain": fp / base_fp,
                     "kv_bytes": kv, "kv_ratio": kv / base_kv, "gqa8_bytes": gqa, "kv_ratio_gqa8": kv / gqa})
    return rows
