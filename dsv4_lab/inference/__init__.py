"""Inference: the heterogeneous KV cache (cache.py, spec §6) and generation (generate.py)."""
from .cache import KVCache, forward_with_cache
from .generate import generate

__all__ = ["KVCache", "forward_with_cache", "generate"]
