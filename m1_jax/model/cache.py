"""Generation caches, owned by the layers that use them, stacked over the model's layers.

* every lightning layer: its float32 state ``[B, H, Dk, Dv]`` (constant in the sequence length);
* every softmax layer: RoPE-rotated keys and values ``[B, K, S, D]`` for ``S`` slots (head-major, so
  one KV head's keys are contiguous for the attention kernels).

Rows are left-padded: row ``b`` holds real tokens from slot ``kv_start[b]`` on; ``length`` slots are
filled (the next call writes at ``length``). A real token's position is ``slot - kv_start[b]``.

The arrays of all layers of a kind are stacked on a leading axis (``lightning [n_lightning, B, H, Dk,
Dv]``, ``keys / values [n_softmax, B, K, S, D]``) and carried through the scan over blocks, where each
layer updates its own entry in place: a decode step writes one token's K/V per softmax layer and never
copies a layer's cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from m1_jax.config import FULL, ModelConfig
from m1_jax.dtypes import as_dtype
from sharding.rules import constrain

KV_AXES = (None, "activation_batch", "activation_kv_heads", None, None)
STATE_AXES = (None, "activation_batch", "activation_heads", None, None)


class Cache(NamedTuple):
    lightning: jax.Array  # [n_lightning_layers, B, H, Dk, Dv] float32
    keys: jax.Array  # [n_softmax_layers, B, K, S, D]
    values: jax.Array  # same as keys
    kv_start: jax.Array  # [B] int32: first real slot of each row
    length: jax.Array  # [] int32: slots filled so far

    @property
    def batch(self) -> int:
        return self.kv_start.shape[0]

    @property
    def slots(self) -> int:
        return self.keys.shape[3]


def layer_counts(config: ModelConfig) -> tuple[int, int]:
    """(lightning layers, softmax layers) in the whole model."""
    n_full = sum(t == FULL for t in config.layer_types)
    return config.num_hidden_layers - n_full, n_full


def cache_index(config: ModelConfig) -> list[int]:
    """For each position ``j`` of a block, its index among the block's layers of the same kind."""
    period = config.layer_types[: config.layer_period]
    seen = {FULL: 0, "other": 0}
    out = []
    for t in period:
        kind = FULL if t == FULL else "other"
        out.append(seen[kind])
        seen[kind] += 1
    return out


def per_block_counts(config: ModelConfig) -> tuple[int, int]:
    period = config.layer_types[: config.layer_period]
    n_full = sum(t == FULL for t in period)
    return len(period) - n_full, n_full


def init_cache(config: ModelConfig, batch: int, slots: int, *, kv_start=None, kv_dtype=None) -> Cache:
    """Zero caches for ``batch`` rows of ``slots`` slots. ``kv_start [B]`` (default 0) is each row's first
    real slot; ``kv_dtype`` (default ``config.dtype``) the K/V storage dtype."""
    c = config
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"init_cache: batch must be a positive int; got {batch!r}")
    if not (isinstance(slots, int) and slots >= 1):
        raise ValueError(f"init_cache: slots must be a positive int; got {slots!r}")
    n_lin, n_full = layer_counts(c)
    dt = as_dtype(kv_dtype or c.dtype)
    kv_shape = (n_full, batch, c.num_key_value_heads, slots, c.head_dim)
    kv_start = jnp.zeros((batch,), jnp.int32) if kv_start is None else jnp.asarray(kv_start, jnp.int32)
    if kv_start.shape != (batch,):
        raise ValueError(f"init_cache: kv_start must be [batch] = [{batch}]; got shape {kv_start.shape}")
    return Cache(
        lightning=constrain(jnp.zeros((n_lin, batch, c.num_attention_heads, c.head_dim, c.head_dim), jnp.float32),
                            STATE_AXES),
        keys=constrain(jnp.zeros(kv_shape, dt), KV_AXES), values=constrain(jnp.zeros(kv_shape, dt), KV_AXES),
        kv_start=kv_start, length=jnp.zeros((), jnp.int32))


__all__ = ["Cache", "KV_AXES", "STATE_AXES", "cache_index", "init_cache", "layer_counts", "per_block_counts"]
