"""Cache sizes and the buckets that keep compilations few.

A prompt of ``T`` tokens is left-padded to a bucket (a power of two up to the prefill chunk, then whole
chunks), and the cache gets a bucketed number of slots (eight sizes per octave, at most 12.5% spare):
a sweep of contexts compiles once per bucket, and different prompts of one bucket share every compiled
function. Padding is exact (see ``m1_jax.model.cache``), so buckets never change a result.
"""

from __future__ import annotations

import numpy as np

from m1_jax.config import ModelConfig
from m1_jax.dtypes import as_dtype
from m1_jax.model.cache import layer_counts

MIN_PROMPT_BUCKET = 8
MIN_NEW_TOKENS_BUCKET = 16
MIN_SLOTS = 256  # a multiple of every key block of the attention kernels
PREFILL_TOKENS = 16384  # default prefill chunk: about this many tokens (rows x chunk) per forward


def cache_bytes(config: ModelConfig, context_len: int, batch: int, *, kv_dtype=None) -> int:
    """Bytes of the generation caches for ``batch`` rows of ``context_len`` tokens: a float32 state
    ``[B, H, Dk, Dv]`` per lightning layer plus K and V ``[B, context_len, kv_heads, head_dim]`` per
    softmax layer in ``kv_dtype`` (default ``config.dtype``)."""
    for name, v in (("context_len", context_len), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"cache_bytes: {name} must be an int >= 0; got {v!r}")
    c = config
    n_lin, n_full = layer_counts(c)
    itemsize = np.dtype(as_dtype(kv_dtype or c.dtype)).itemsize
    state = n_lin * batch * c.num_attention_heads * c.head_dim * c.head_dim * 4
    kv = n_full * 2 * batch * context_len * c.num_key_value_heads * c.head_dim * itemsize
    return int(state + kv)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_at_most(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def default_prefill_chunk(batch: int) -> int:
    """Chunk length that keeps one prefill forward near ``PREFILL_TOKENS`` tokens (power of two >= 16)."""
    return max(16, pow2_at_most(max(1, PREFILL_TOKENS // max(int(batch), 1))))


def prompt_bucket(T: int, chunk: int) -> int:
    """Left-padded prompt length: a power of two (at least 8) up to ``chunk``, then a multiple of ``chunk``."""
    if T > chunk:
        return -(-T // chunk) * chunk
    return min(max(MIN_PROMPT_BUCKET, pow2_at_least(T)), chunk)


def new_tokens_bucket(n: int) -> int:
    """Size of the token buffers of the decode loop (the loop itself stops at ``n``)."""
    return max(MIN_NEW_TOKENS_BUCKET, pow2_at_least(n))


def slots_bucket(n: int) -> int:
    """Cache slots for ``n`` tokens: ``n`` rounded up to 1/8 of its octave (and to ``MIN_SLOTS``)."""
    n = max(int(n), MIN_SLOTS)
    step = max(MIN_SLOTS, pow2_at_most(n) // 8)
    return -(-n // step) * step


__all__ = ["cache_bytes", "default_prefill_chunk", "new_tokens_bucket", "prompt_bucket", "slots_bucket"]
