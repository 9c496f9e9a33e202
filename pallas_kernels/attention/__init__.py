"""Softmax-attention kernels: attention over a KV cache (chunked prefill, split-K decoding) and packed-row
flash attention for training. Imports nothing from ``m1_jax`` or ``sharding``."""

from pallas_kernels.attention.op import BACKENDS, cache_attention, cache_block_k, flash_attention
from pallas_kernels.attention.xla import cache_attention_xla, flash_attention_xla

__all__ = ["BACKENDS", "cache_attention", "cache_attention_xla", "cache_block_k", "flash_attention",
           "flash_attention_xla"]
