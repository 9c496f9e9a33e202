"""Sampling one token per row from float32 logits, inside the compiled decode loop.

Greedy when the temperature is 0; otherwise the logits are divided by the temperature, filtered by top-k
then top-p (nucleus: the most likely token always survives), and sampled. The returned log-probability is
always that of the model's own distribution (temperature 1, unfiltered), the quantity policy losses
compare.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingMode(NamedTuple):
    """The static part of the sampling settings (a change recompiles; temperature and top_p do not)."""

    greedy: bool
    top_k: int | None
    use_top_p: bool


def sample_token(logits, key, mode: SamplingMode, temperature, top_p):
    """``logits [B, V]`` -> ``(token [B] int32, logprob [B] float32)``."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if mode.greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        if mode.top_k is not None:
            kth = jax.lax.top_k(scaled, mode.top_k)[0][..., -1:]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        if mode.use_top_p:
            order = jnp.argsort(-scaled, axis=-1)
            sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
            drop_sorted = before >= top_p  # the top token always stays
            rows = jnp.arange(scaled.shape[0])[:, None]
            drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
            scaled = jnp.where(drop, -jnp.inf, scaled)
        token = jax.random.categorical(key, scaled, axis=-1)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


__all__ = ["SamplingMode", "sample_token"]
