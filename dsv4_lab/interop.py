"""Conversion between HF transformers `DeepseekV4ForCausalLM` and DSV4LM (docs/hf_parity.md §E).

    model = from_hf(hf_model)            # config mapped, every weight and buffer copied (tid2eid, bias included)
    hf_model = to_hf(model)              # the reverse (needs transformers; fp32)

HF-compat settings that `from_hf` sets (docs/hf_parity.md §A): shared_expert_clamp=True (HF clamps the shared expert,
9c), quant="none" (HF has no FP8/FP4 simulation, 3d), mtp_depth=0 (HF has no MTP, 10), index_hadamard=False (HF has
none; harmless without FP4, 3c), anticipatory="off", YaRN taken from the HF config's "compress" rope parameters (5c:
absent there = no YaRN, yarn_factor=1). Our RoPE has no YaRN attention factor (docs §2.6: cos/sin are not scaled),
so an HF config whose compress rope scales cos/sin by attention_factor != 1 (HF derives 0.1 ln(factor) + 1 when
`rope_parameters` comes nested as {main, compress} without the key) is refused, as is a non-default main rope; the
RoPE bases are read from those nested dicts, which is where HF reads them. HF's flatten-RMS eps is rms_norm_eps, which is our norm_eps (8).
Weights go through the in-memory state_dict (11f). Parity holds in fp32 only (11a).
"""
from __future__ import annotations


import torch

from .config import ConfigError, ModelConfig
from .model import DSV4LM

HF_LAYER_TYPES = {"swa": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}
OUR_LAYER_TYPES = {v: k for k, v in HF_LAYER_TYPES.items()}

# ours -> HF names inside one attention layer (also used by the per-layer parity test in tests/test_attention.py)
ATTN_NAMES = {"wq_a": "q_a_proj", "q_norm": "q_a_norm", "wq_b": "q_b_proj", "wkv": "kv_proj", "kv_norm": "kv_norm",
              "wo_a": "o_a_proj", "wo_b": "o_b_proj", "attn_sink": "sinks",
              "compressor.wkv": "compressor.kv_proj", "compressor.wgate": "compressor.gate_proj",
              "compressor.ape": "compressor.position_bias", "compressor.norm": "compressor.kv_norm",
              "indexer.wq_b": "compressor.indexer.q_b_proj",
              "indexer.weights_proj": "compressor.indexer.scorer.weights_proj",
              "indexer.compressor.wkv": "compressor.indexer.kv_proj",
              "indexer.compressor.wgate": "compressor.indexer.gate_proj",
              "indexer.compressor.ape": "compressor.indexer.position_bias",
              "indexer.compressor.norm": "compressor.indexer.kv_norm"}


def attn_name_to_hf(n: str) -> str:
    for k in sorted(ATTN_NAMES, key=len, reverse=True):
        if n == k or n.startswith(k + "."):
            return ATTN_NAMES[k] + n[len(k):]
    raise KeyError(f"attention parameter {n!r} has no HF counterpart")


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------

def config_from_hf(hc, max_seq_len: int | None = None) -> ModelConfig:
    """HF DeepseekV4Config -> ModelConfig with the HF-compat flags. max_seq_len defaults to
    min(max_position_embeddings, 4096) (our RoPE tables are materialised up to it)."""
    mlp = list(hc.mlp_layer_types)
    n_hash = 0
    while n_hash < len(mlp) and mlp[n_hash] == "hash_moe":
        n_hash += 1
    if "hash_moe" in mlp[n_hash:]:
        raise ValueError(f"HF mlp_layer_types = {mlp} is not allowed: hash_moe layers must come first "
                         "(our n_hash_layers routes the first layers)")
    if hc.scoring_func not in ("sqrtsoftplus", "sigmoid"):
        raise ValueError(f"HF scoring_func = {hc.scoring_func!r} is not allowed: sqrtsoftplus or sigmoid")
    rp = hc.rope_parameters or {}
    main, comp = rp.get("main", {}), rp.get("compress", {})
    if main.get("rope_type", "default") != "default":
        raise ConfigError(f"HF rope_parameters['main'] rope_type = {main.get('rope_type')!r} is not allowed: "
                          "'default' (sliding-window layers use plain RoPE, docs §2.6)")
    if comp.get("rope_type", "default") not in ("default", "yarn"):
        raise ConfigError(f"HF rope_parameters['compress'] rope_type = {comp.get('rope_type')!r} is not allowed: "
                          "'default' or 'yarn'")
    yarn = comp.get("rope_type", "default") == "yarn"
    factor = hf_attention_factor(hc, "compress") if yarn else 1.0
    if abs(factor - 1.0) > 1e-12:
        raise ConfigError(f"HF rope_parameters['compress'] gives YaRN attention_factor = {factor:.6g} (cos/sin "
                          "scaled): not allowed, our RoPE has no such factor (docs §2.6); set "
                          "rope_parameters['compress']['attention_factor'] = 1.0 as the V4 reference does")
    rates = hc.compress_rates
    T = max_seq_len or min(hc.max_position_embeddings, 4096)
    return ModelConfig(
        vocab_size=hc.vocab_size, d_model=hc.hidden_size, layer_types=[OUR_LAYER_TYPES[t] for t in hc.layer_types],
        max_seq_len=T, norm_eps=hc.rms_norm_eps, init_std=hc.initializer_range,
        n_heads=hc.num_attention_heads, head_dim=hc.head_dim, rope_head_dim=hc.qk_rope_head_dim,
        q_lora_rank=hc.q_lora_rank, qk_norm=True, attn_sink=True, output_rope=True, o_groups=hc.o_groups,
        o_lora_rank=hc.o_lora_rank, window=hc.sliding_window, window_branch=True, rope_theta=float(main.get("rope_theta", hc.rope_theta)),
        compress_rope_theta=float(comp.get("rope_theta", hc.compress_rope_theta)),
        yarn_factor=float(comp.get("factor", 1.0)) if yarn else 1.0,
        yarn_original_seq_len=int(comp.get("original_max_position_embeddings", 65536)),
        yarn_beta_fast=float(comp.get("beta_fast", 32.0)), yarn_beta_slow=float(comp.get("beta_slow", 1.0)),
        csa_ratio=rates["compressed_sparse_attention"], hca_ratio=rates["heavily_compressed_attention"],
        compressor_overlap=True, index_n_heads=hc.index_n_heads, index_head_dim=hc.index_head_dim,
        index_topk=min(hc.index_topk, T // rates["compressed_sparse_attention"]),   # K = min(topk, #entries) anyway
        index_mode="learned", index_hadamard=False,
        residual="mhc", hc_mult=hc.hc_mult, hc_sinkhorn_iters=hc.hc_sinkhorn_iters, hc_eps=hc.hc_eps,
        ffn="moe", n_routed_experts=hc.n_routed_experts, n_activated_experts=hc.num_experts_per_tok,
        n_shared_experts=1, moe_inter_dim=hc.moe_intermediate_size, score_func=hc.scoring_func,
        route_scale=float(hc.routed_scaling_factor), n_hash_layers=n_hash, swiglu_limit=float(hc.swiglu_limit),
        shared_expert_clamp=True, anticipatory="off", mtp_depth=0, quant="none")


def hf_attention_factor(hc, layer_type: str) -> float:
    """The factor HF multiplies this rope type's cos and sin by, computed by HF's own rope init function."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope_type = hc.rope_parameters[layer_type].get("rope_type", "default")
    if rope_type == "default":
        return 1.0
    return float(ROPE_INIT_FUNCTIONS[rope_type](hc, "cpu", layer_type=layer_type)[1])


def config_to_hf(cfg: ModelConfig):
    """ModelConfig -> HF DeepseekV4Config (needs residual=mhc, ffn=moe, one shared expert, no dense layers)."""
    from transformers import DeepseekV4Config
    bad = {"residual": cfg.residual != "mhc", "ffn": cfg.ffn != "moe", "n_shared_experts": cfg.n_shared_experts != 1,
           "layer_types": "dense" in cfg.layer_types, "quant": cfg.quant != "none",
           "compressor_overlap": not cfg.compressor_overlap, "q_lora_rank": cfg.q_lora_rank <= 0,
           "o_groups": cfg.o_groups <= 0, "qk_norm": not cfg.qk_norm, "attn_sink": not cfg.attn_sink,
           "output_rope": not cfg.output_rope, "window_branch": not cfg.window_branch}
    for k, b in bad.items():
        if b:
            raise ValueError(f"config field '{k}' = {getattr(cfg, k)!r} has no HF DeepseekV4 counterpart")
    rope = None
    if cfg.yarn_factor > 1:
        rope = {"rope_type": "yarn", "factor": cfg.yarn_factor, "original_max_position_embeddings":
                cfg.yarn_original_seq_len, "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}
    L = cfg.n_layers
    hc = DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=L, num_attention_heads=cfg.n_heads, num_key_value_heads=1, head_dim=cfg.head_dim,
        qk_rope_head_dim=cfg.rope_head_dim, q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.n_activated_experts,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=1, scoring_func=cfg.score_func,
        routed_scaling_factor=cfg.route_scale, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        layer_types=[HF_LAYER_TYPES[t] for t in cfg.layer_types],
        compress_rates={"compressed_sparse_attention": cfg.csa_ratio, "heavily_compressed_attention": cfg.hca_ratio},
        compress_rope_theta=cfg.compress_rope_theta, hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps, mlp_layer_types=["hash_moe" if i < cfg.n_hash_layers else "moe" for i in range(L)],
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.window, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        num_nextn_predict_layers=0, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, use_cache=False,
        rope_parameters=rope)
    hc._attn_implementation = "eager"
    return hc


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------

def hf_name(name: str) -> str | None:
    """HF name of one of our state entries; None for routed-expert weights (packed, see `_hf_state`) and the
    non-persistent RoPE tables."""
    parts = name.split(".")
    if parts[-1] in ("cos", "sin") or (parts[0] == "blocks" and parts[2:4] == ["ffn", "experts"]):
        return None
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "head.weight":
        return "lm_head.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if parts[0] == "hc_head":
        return "model." + name                                   # hc_fn, hc_base, hc_scale
    if parts[0] != "blocks":
        raise KeyError(f"entry {name!r} has no HF counterpart")
    i, sub, rest = parts[1], parts[2], ".".join(parts[3:])
    pre = f"model.layers.{i}."
    if sub in ("attn_res", "ffn_res"):
        return pre + ("attn_hc." if sub == "attn_res" else "ffn_hc.") + rest   # fn, base, scale
    if sub == "attn_norm":
        return pre + "input_layernorm." + rest
    if sub == "ffn_norm":
        return pre + "post_attention_layernorm." + rest
    if sub == "attn":
        return pre + "self_attn." + attn_name_to_hf(rest)
    if sub == "ffn" and parts[3] == "gate":                      # weight, e_score_correction_bias, tid2eid
        return pre + "mlp." + rest
    if sub == "ffn" and parts[3] == "shared_expert":
        return pre + "mlp.shared_experts." + {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[parts[4]] + ".weight"
    raise KeyError(f"entry {name!r} has no HF counterpart")


def _hf_state(model: DSV4LM) -> dict[str, torch.Tensor]:
    """Our state (parameters + persistent buffers) under HF names; routed experts packed as HF stores them."""
    out = {hf_name(n): t.detach() for n, t in model.state_dict().items() if hf_name(n) is not None}
    for i, blk in enumerate(model.blocks):
        ex = blk.ffn.experts
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.w1.weight, e.w3.weight], 0) for e in ex]).detach()   # [N, 2I, d]: gate rows, then up
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([e.w2.weight for e in ex]).detach()
    return out


def to_hf(model: DSV4LM):
    """DSV4LM -> HF DeepseekV4ForCausalLM (fp32, eager attention) with the same weights."""
    from transformers import DeepseekV4ForCausalLM
    hf = DeepseekV4ForCausalLM(config_to_hf(model.cfg)).float().eval()
    missing, unexpected = hf.load_state_dict(_hf_state(model), strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise KeyError(f"to_hf: missing {missing}, unexpected {unexpected}")
    return hf


@torch.no_grad()
def from_hf(hf_model, max_seq_len: int | None = None) -> DSV4LM:
    """HF DeepseekV4ForCausalLM -> DSV4LM (same weights, HF-compat flags; see the module docstring)."""
    cfg = config_from_hf(hf_model.config, max_seq_len)
    model = DSV4LM(cfg).float()
    hf_sd = hf_model.state_dict()
    used = set()
    for name, t in model.state_dict().items():
        hn = hf_name(name)
        if hn is None:
            continue
        if hn not in hf_sd:
            raise KeyError(f"from_hf: HF model has no {hn!r} (for our {name!r})")
        src = hf_sd[hn]
        if src.shape != t.shape:
            raise ValueError(f"from_hf: {hn} has shape {tuple(src.shape)}, ours {name} {tuple(t.shape)}")
        t.copy_(src.to(t.dtype))
        used.add(hn)
    I = cfg.moe_inter_dim
    for i, blk in enumerate(model.blocks):
        gu, dn = (hf_sd[f"model.layers.{i}.mlp.experts.{k}"] for k in ("gate_up_proj", "down_proj"))
        used |= {f"model.layers.{i}.mlp.experts.{k}" for k in ("gate_up_proj", "down_proj")}
        for e, ex in enumerate(blk.ffn.experts):
            ex.w1.weight.copy_(gu[e, :I])
            ex.w3.weight.copy_(gu[e, I:])
            ex.w2.weight.copy_(dn[e])
    unused = {k for k in hf_sd if k not in used and not k.endswith("inv_freq")}
    if unused:
        raise KeyError(f"from_hf: HF entries with no counterpart: {sorted(unused)[:8]}")
    for blk in model.blocks:                                  # hash tables must come from the checkpoint (9b)
        g = blk.ffn.gate
        if g.is_hash and not g.tid2eid.any():
            raise ValueError("HF tid2eid is all zero (a fresh HF model): every token would go to expert 0; "
                             "load a checkpoint or fill it before converting (docs/hf_parity.md 9b)")
    return model.eval()
