"""Inference: the heterogeneous KV cache (cache.py, docs §6) and generation (generate.py), MTP self-speculative decoding (speculative.py)."""
from .cache import KVCache
from .generate import generate
from .speculative import speculative_generate

__all__ = ["KVCache", "generate", "speculative_generate"]
