"""Prefill and decode with caches, and sampling.

Caches: every lightning layer keeps its float32 state ``[B, H, Dk, Dv]`` (constant size in the
sequence length); every softmax layer keeps rotated keys and values ``[B, S, K, D]`` for ``S`` slots.
Prompts are left-padded: padding gets zero q/k/v in the lightning layers (so the state is exactly
that of the unpadded prompt), is never attended to by real tokens, and real tokens get positions
counted from their first real token.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.config import FULL
from m1_jax.model.decoder import check_token_ids
from m1_jax.model.layers import as_dtype


class Cache(NamedTuple):
    lightning: jax.Array  # [blocks, lightning layers per block, B, H, Dk, Dv] float32
    keys: jax.Array  # [blocks, softmax layers per block, B, S, K, D]
    values: jax.Array  # same as keys
    key_valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    length: jax.Array  # [] int32: slots filled so far


def init_cache(config, batch: int, slots: int) -> Cache:
    c = config
    period = c.layer_types[: c.layer_period]
    n_full = sum(t == FULL for t in period)
    n_lin = len(period) - n_full
    dt = as_dtype(c.dtype)
    kv_shape = (c.num_blocks, n_full, batch, slots, c.num_key_value_heads, c.head_dim)
    return Cache(
        lightning=jnp.zeros((c.num_blocks, n_lin, batch, c.num_attention_heads, c.head_dim, c.head_dim), jnp.float32),
        keys=jnp.zeros(kv_shape, dt), values=jnp.zeros(kv_shape, dt),
        key_valid=jnp.zeros((batch, slots), bool), length=jnp.zeros((), jnp.int32))


def _cached_softmax_attention(attn, u, positions, k_cache, v_cache, start, key_valid):
    """Write this call's keys/values at slots ``[start, start + T)`` and attend over the whole cache."""
    q, k, v = attn.project_qkv(u, positions)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
    T, S = q.shape[1], k_cache.shape[1]
    q_slot = start + jnp.arange(T)
    slot = jnp.arange(S)
    causal = slot[None, :] <= q_slot[:, None]  # [T, S]
    # Real keys only; a padding query sees itself so that its (discarded) row stays finite.
    visible = key_valid[:, None, :] | (slot[None, None, :] == q_slot[None, :, None])
    mask = (causal[None] & visible)[:, None]  # [B, 1, T, S]
    o = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask,
                                     implementation="xla")
    return attn.output(o), k_cache, v_cache


def forward_with_cache(model, input_ids, positions, token_valid, cache: Cache):
    """Run ``T`` new tokens through the model on top of ``cache``; returns (last-position logits
    ``[B, V]`` float32, updated cache)."""
    c = model.config
    period = c.layer_types[: c.layer_period]
    lin_index = {j: i for i, j in enumerate(j for j, t in enumerate(period) if t != FULL)}
    full_index = {j: i for i, j in enumerate(j for j, t in enumerate(period) if t == FULL)}
    start = cache.length
    key_valid = jax.lax.dynamic_update_slice(cache.key_valid, token_valid, (0, start))
    graphdef, state = nnx.split(model.blocks)

    def body(h, xs):
        block_state, b, lin_states, keys, values = xs
        block = nnx.merge(graphdef, block_state)
        new_lin, new_k, new_v = list(lin_states), list(keys), list(values)
        for j, layer in enumerate(block.layers):
            if layer.is_softmax:
                i = full_index[j]

                def attend(u, i=i, attn=layer.self_attn):
                    a, new_k[i], new_v[i] = _cached_softmax_attention(attn, u, positions, keys[i], values[i],
                                                                      start, key_valid)
                    return a
            else:
                i = lin_index[j]

                def attend(u, i=i, j=j, attn=layer.self_attn):
                    a, new_lin[i] = attn(u, b * c.layer_period + j, initial_state=lin_states[i],
                                         return_state=True, token_mask=token_valid)
                    return a
            h, _ = layer.residual_forward(h, attend)

        def stack(xs, like):
            return jnp.stack(xs) if xs else like
        return h, (stack(new_lin, lin_states), stack(new_k, keys), stack(new_v, values))

    x = model.embed(input_ids)
    blocks = jnp.arange(c.num_blocks, dtype=jnp.int32)
    h, (lin, keys, values) = jax.lax.scan(body, x, (state, blocks, cache.lightning, cache.keys, cache.values))
    logits = model.logits(model.norm(h[:, -1:]))[:, 0]
    new_cache = Cache(lin, keys, values, key_valid, start + input_ids.shape[1])
    return logits, new_cache


@nnx.jit
def prefill(model, input_ids, lengths, cache: Cache):
    B, T = input_ids.shape
    pad = (T - lengths)[:, None]
    idx = jnp.arange(T)[None, :]
    valid = idx >= pad
    positions = jnp.maximum(idx - pad, 0).astype(jnp.int32)
    return forward_with_cache(model, input_ids, positions, valid, cache)


@nnx.jit(donate_argnames=("cache",))
def decode_step(model, tokens, positions, cache: Cache):
    """One token per row: ``tokens [B]`` at ``positions [B]``."""
    valid = jnp.ones((tokens.shape[0], 1), bool)
    return forward_with_cache(model, tokens[:, None], positions[:, None], valid, cache)


def sample_token(logits, key, temperature: float, top_k: int | None, top_p: float | None):
    """Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p (nucleus) filtering.
    Returns ``(token [B] int32, logprob [B])`` with the log-probability under the model's own
    (temperature 1, unfiltered) distribution, the quantity RL objectives compare."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        if top_p is not None:
            order = jnp.argsort(-scaled, axis=-1)
            sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
            drop_sorted = before >= top_p  # the top token always stays
            drop = jnp.zeros_like(drop_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(drop_sorted)
            scaled = jnp.where(drop, -jnp.inf, scaled)
        token = jax.random.categorical(key, scaled, axis=-1)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


_sample = jax.jit(sample_token, static_argnums=(2, 3, 4))


def _check_generate_args(model, input_ids, max_new_tokens, lengths, temperature, top_k, top_p):
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, prompt_len]; got shape {input_ids.shape}")
    B, T = input_ids.shape
    if T < 1:
        raise ValueError("input_ids must hold at least one prompt token per row")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if lengths.shape != (B,) or np.any(lengths < 1) or np.any(lengths > T):
        raise ValueError(f"lengths must be [B] = [{B}] with 1 <= length <= prompt_len = {T}; got {lengths}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size = {model.config.vocab_size}]; got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")


def generate(model, input_ids, *, max_new_tokens: int, lengths=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] = ()):
    """Generate ``max_new_tokens`` after left-padded prompts.

    Args:
      input_ids: int32 ``[B, T]``, left-padded; ``lengths [B]`` the real prompt lengths (all of T if omitted).
      temperature: 0 is greedy. ``top_k`` / ``top_p`` filter the sampling distribution.
      stop_tokens: a row that emits one of these stops; its later entries repeat that stop token with
        log-probability 0.

    Returns:
      ``(tokens [B, max_new_tokens] int32, logprobs [B, max_new_tokens] float32)``.
    """
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape if input_ids.ndim == 2 else (0, 0)
    lengths_np = np.full((B,), T) if lengths is None else np.asarray(lengths)
    _check_generate_args(model, input_ids, max_new_tokens, lengths_np, temperature, top_k, top_p)
    check_token_ids(input_ids, model.config.vocab_size)
    lengths = jnp.asarray(lengths_np, jnp.int32)
    cache = init_cache(model.config, B, T + max_new_tokens)
    logits, cache = prefill(model, input_ids.astype(jnp.int32), lengths, cache)
    stops = np.asarray(list(stop_tokens), np.int32)
    key = jax.random.key(seed)
    tokens = np.zeros((B, max_new_tokens), np.int32)
    logprobs = np.zeros((B, max_new_tokens), np.float32)
    finished = np.zeros(B, bool)
    last = np.zeros(B, np.int32)
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok, lp = _sample(logits, sub, float(temperature), top_k, top_p)
        tok, lp = np.asarray(tok), np.asarray(lp)
        tokens[:, i] = np.where(finished, last, tok)
        logprobs[:, i] = np.where(finished, 0.0, lp)
        last = np.where(finished, last, tok)
        finished |= np.isin(tokens[:, i], stops)
        if finished.all():
            tokens[:, i + 1:] = last[:, None]
            break
        if i + 1 < max_new_tokens:
            logits, cache = decode_step(model, jnp.asarray(tokens[:, i]), lengths + i, cache)
    return jnp.asarray(tokens), jnp.asarray(logprobs)
