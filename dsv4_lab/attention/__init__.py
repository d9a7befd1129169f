"""Attention layers by type (docs §2-§4): dense (baseline), swa (window only), csa, hca."""
from ..config import ModelConfig
from .attention import Attention


def build_attention(cfg: ModelConfig, layer_idx: int):
    t = cfg.layer_types[layer_idx]
    if t in ("dense", "swa"):
        return Attention(cfg, layer_idx, t)
    if t == "csa":
        from .csa import CSAttention
        return CSAttention(cfg, layer_idx)
    if t == "hca":
        from .hca import HCAttention
        return HCAttention(cfg, layer_idx)
    raise ValueError(f"layer type {t!r} has no attention implementation")
