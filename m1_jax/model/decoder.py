"""Decoder layers, the scanned 7+1 block stack, and the causal LM.

Each layer is DeepNorm post-norm: ``u = norm(h); h1 = a_attn*u + b_attn*attn(u); w = norm(h1);
out = a_mlp*w + b_mlp*moe(w)`` (the residual is the *normalised* input).

The layer pattern has period p (7 lightning + 1 softmax for MiniMax); the L layers are held as
L/p stacked blocks and run as a ``lax.scan`` over blocks (``scan_layers=False`` loops in Python over
the same parameters, for debugging). ``remat`` wraps each block in ``jax.checkpoint``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.config import FULL, ModelConfig
from m1_jax.model.cache import Cache, cache_index, init_cache, per_block_counts
from m1_jax.model.layers import RMSNorm, as_dtype, param
from m1_jax.model.lightning import LightningAttention
from m1_jax.model.moe import MoE, RouterStats, load_balancing_loss
from m1_jax.model.softmax_attention import KVSlot, SoftmaxAttention
from sharding.rules import constrain

_ACT = ("activation_batch", "activation_length", "activation_embed")

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        c = config
        self.is_softmax = layer_type == FULL
        pdt = as_dtype(c.param_dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, axes=("norm",), param_dtype=pdt)
        self.self_attn = SoftmaxAttention(c, rngs=rngs) if self.is_softmax else LightningAttention(c, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, axes=("norm",), param_dtype=pdt)
        self.block_sparse_moe = MoE(c, rngs=rngs)
        if self.is_softmax:
            self.alpha, self.beta = c.full_attn_alpha_factor, c.full_attn_beta_factor
        else:
            self.alpha, self.beta = c.linear_attn_alpha_factor, c.linear_attn_beta_factor
        self.mlp_alpha, self.mlp_beta = c.mlp_alpha_factor, c.mlp_beta_factor

    def __call__(self, h, layer_idx, positions, segment_ids=None, *, cache=None, token_mask=None):
        """``(output, router_stats)``; with ``cache`` (this layer's: a lightning state or a ``KVSlot``)
        ``(output, router_stats, new_cache)``."""
        if cache is None:
            if self.is_softmax:
                return self.residual_forward(h, lambda u: self.self_attn(u, positions, segment_ids=segment_ids))
            return self.residual_forward(h, lambda u: self.self_attn(u, layer_idx, segment_ids=segment_ids))
        new = []

        def attend(u):
            if self.is_softmax:
                a, c = self.self_attn(u, positions, segment_ids=segment_ids, cache=cache)
            else:
                a, c = self.self_attn(u, layer_idx, segment_ids=segment_ids, state=cache, token_mask=token_mask)
            new.append(c)
            return a

        out, stats = self.residual_forward(h, attend)
        return out, stats, new[0]

    def residual_forward(self, h, attend):
        """The DeepNorm layer around an attention function ``attend(u) -> a``; returns
        ``(output, router_stats)``."""
        u = self.input_layernorm(h)
        h = self.alpha * u + self.beta * attend(u)
        w = self.post_attention_layernorm(h)
        f, stats = self.block_sparse_moe(w)
        return self.mlp_alpha * w + self.mlp_beta * f, stats


class DecoderBlock(nnx.Module):
    """One period of the layer pattern (7 lightning + 1 softmax for MiniMax)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        types = config.layer_types[: config.layer_period]
        self.layers = nnx.List([DecoderLayer(config, t, rngs=rngs) for t in types])

    def __call__(self, h, layer_offset, positions, segment_ids=None):
        stats = []
        for j, layer in enumerate(self.layers):
            h, s = layer(h, layer_offset + j, positions, segment_ids)
            stats.append(s)
        return h, jax.tree.map(lambda *xs: jnp.stack(xs), *stats)

    def with_cache(self, h, block, positions, cache: Cache, token_mask):
        """The block on top of the model's stacked ``cache``: every layer reads and updates its own
        entry in place (``block`` is this block's index); returns ``(h, stats, cache)``."""
        c = self.layers[0].self_attn.config
        n_lin, n_full = per_block_counts(c)
        rank = cache_index(c)
        lightning, keys, values = cache.lightning, cache.keys, cache.values
        stats = []
        for j, layer in enumerate(self.layers):
            if layer.is_softmax:
                slot = KVSlot(keys, values, block * n_full + rank[j], cache.length, cache.kv_start)
                h, s, slot = layer(h, block * c.layer_period + j, positions, cache=slot)
                keys, values = slot.keys, slot.values
            else:
                i = block * n_lin + rank[j]
                state = jax.lax.dynamic_index_in_dim(lightning, i, keepdims=False)
                h, s, state = layer(h, block * c.layer_period + j, positions, cache=state, token_mask=token_mask)
                lightning = jax.lax.dynamic_update_index_in_dim(lightning, state, i, 0)
            stats.append(s)
        cache = cache._replace(lightning=lightning, keys=keys, values=values)
        return h, jax.tree.map(lambda *xs: jnp.stack(xs), *stats), cache


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its document (documents are contiguous runs of one id)."""
    B, T = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Shape/dtype checks always; value range when the ids are concrete (out-of-range ids that reach a
    traced call give NaN logits, never a silently clipped lookup)."""
    if not hasattr(input_ids, "ndim") or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be an int array [batch, seq]; got shape {getattr(input_ids, 'shape', None)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must have an integer dtype; got {input_ids.dtype}")
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(f"input_ids out of range: found {bad.flat[0]} (and {bad.size - 1} more); "
                         f"expected 0 <= id < vocab_size = {vocab_size}")


class MiniMaxForCausalLM(nnx.Module):
    """MiniMax-Text-01 / MiniMax-M1 causal LM. ``model(input_ids)`` -> float32 logits ``[B, T, V]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt = as_dtype(c.param_dtype)
        self.embed_tokens = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pdt,
                                  std=c.initializer_range)

        @nnx.split_rngs(splits=c.num_blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return DecoderBlock(c, rngs=r)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, axes=("norm",), param_dtype=pdt)
        self.lm_head = param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pdt,
                             std=c.initializer_range)

    # -- pieces, exposed for losses that never materialise all logits at once
    def embed(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        check_token_ids(input_ids, c.vocab_size)
        table = self.embed_tokens.value.astype(as_dtype(c.dtype))
        return jnp.take(table, input_ids, axis=0, mode="fill", fill_value=jnp.nan)

    def init_cache(self, batch: int, slots: int, *, kv_start=None, kv_dtype=None) -> Cache:
        """Empty generation caches for ``batch`` left-padded rows of ``slots`` slots (see
        ``m1_jax.model.cache``); ``kv_start [B]`` is each row's first real slot."""
        return init_cache(self.config, batch, slots, kv_start=kv_start, kv_dtype=kv_dtype)

    def hidden_states(self, input_ids, *, positions=None, segment_ids=None, cache: Cache | None = None):
        """Final-normed hidden states ``[B, T, hidden]`` and the per-layer router statistics; with a
        ``cache`` also the updated cache: ``(h, stats, new_cache)``."""
        c = self.config
        if cache is not None:
            return self._hidden_states_cached(input_ids, positions, segment_ids, cache)
        x = constrain(self.embed(input_ids), _ACT)
        B, T = input_ids.shape
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
        graphdef, state = nnx.split(self.blocks)
        p = c.layer_period

        def body(h, xs):
            block_state, b = xs
            block = nnx.merge(graphdef, block_state)
            h, s = block(h, b * p, positions, segment_ids)
            return constrain(h, _ACT), s

        if c.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        block_ids = jnp.arange(c.num_blocks, dtype=jnp.int32)
        if c.scan_layers:
            h, stats = jax.lax.scan(body, x, (state, block_ids))
        else:
            h, per_block = x, []
            for b in range(c.num_blocks):
                h, s = body(h, (jax.tree.map(lambda a, b=b: a[b], state), block_ids[b]))
                per_block.append(s)
            stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)
        stats = jax.tree.map(lambda a: a.reshape((c.num_hidden_layers,) + a.shape[2:]), stats)
        return self.norm(h), stats

    def _hidden_states_cached(self, input_ids, positions, segment_ids, cache: Cache):
        c = self.config
        if segment_ids is not None:
            raise ValueError("MiniMaxForCausalLM: segment_ids (packed rows) cannot be combined with a cache; "
                             "a cache holds one sequence per row")
        if not isinstance(cache, Cache):
            raise ValueError(f"MiniMaxForCausalLM: cache must be an m1_jax.model.cache.Cache (from "
                             f"model.init_cache); got {type(cache).__name__}")
        B, T = input_ids.shape
        if cache.batch != B:
            raise ValueError(f"MiniMaxForCausalLM: input_ids has {B} rows but the cache has {cache.batch}")
        if T > cache.slots:
            raise ValueError(f"MiniMaxForCausalLM: {T} tokens do not fit a cache of {cache.slots} slots")
        if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) + T > cache.slots:
            # (traced lengths are the engine's, which sizes the cache; a write past the end would be clamped)
            raise ValueError(f"MiniMaxForCausalLM: {T} tokens after {int(cache.length)} filled slots do not fit a "
                             f"cache of {cache.slots} slots")
        x = constrain(self.embed(input_ids), _ACT)
        slots = cache.length + jnp.arange(T, dtype=jnp.int32)
        token_mask = slots[None, :] >= cache.kv_start[:, None]  # left padding: False
        if positions is None:
            positions = jnp.maximum(slots[None, :] - cache.kv_start[:, None], 0)
        graphdef, state = nnx.split(self.blocks)

        def body(carry, xs):
            h, cache = carry
            block_state, b = xs
            block = nnx.merge(graphdef, block_state)
            h, s, cache = block.with_cache(h, b, positions, cache, token_mask)
            return (constrain(h, _ACT), cache), s

        block_ids = jnp.arange(c.num_blocks, dtype=jnp.int32)
        if c.scan_layers:
            (h, cache), stats = jax.lax.scan(body, (x, cache), (state, block_ids))
        else:
            carry, per_block = (x, cache), []
            for b in range(c.num_blocks):
                carry, s = body(carry, (jax.tree.map(lambda a, b=b: a[b], state), block_ids[b]))
                per_block.append(s)
            (h, cache), stats = carry, jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)
        stats = jax.tree.map(lambda a: a.reshape((c.num_hidden_layers,) + a.shape[2:]), stats)
        return self.norm(h), stats, cache._replace(length=cache.length + T)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head in float32 (the M1 fix for train/inference probability mismatch)."""
        logits = jnp.einsum("bth,hv->btv", h.astype(jnp.float32), self.lm_head.value.astype(jnp.float32))
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, input_ids, *, positions=None, segment_ids=None, cache: Cache | None = None,
                 return_aux: bool = False):
        """float32 logits ``[B, T, V]``; ``return_aux=True`` adds the load-balancing loss.

        With ``cache`` (``model.init_cache``) the tokens are appended at slots ``[cache.length,
        cache.length + T)`` and the result is ``(logits, new_cache)`` (``(logits, aux, new_cache)`` with
        ``return_aux``); positions then default to ``slot - kv_start`` per row.
        """
        out = self.hidden_states(input_ids, positions=positions, segment_ids=segment_ids, cache=cache)
        h, stats = out[0], out[1]
        logits = self.logits(h)
        aux = (load_balancing_loss(stats),) if return_aux else ()
        if cache is not None:
            return (logits, *aux, out[2])
        return (logits, *aux) if return_aux else logits


__all__ = ["MiniMaxForCausalLM", "DecoderBlock", "DecoderLayer", "RouterStats", "positions_from_segments"]
