"""The router: float32 softmax over all experts, top-k, renormalised weights; load-balancing loss."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RouterStats(NamedTuple):
    """Per-layer statistics for the load-balancing loss (Switch / Mixtral form).

    ``tokens_per_expert [k, E]``: fraction of tokens whose j-th choice is expert e.
    ``prob_per_expert [E]``: mean router probability of expert e.
    ``dropped_fraction []``: fraction of (token, choice) pairs dropped by a capacity-based dispatch
    (``moe_impl="ep_capacity"``); 0 for the dropless implementations.
    """

    tokens_per_expert: jax.Array
    prob_per_expert: jax.Array
    dropped_fraction: jax.Array | float = 0.0


def route(x: jax.Array, router_w: jax.Array, top_k: int):
    """Router logits in float32 -> softmax over all experts -> top-k -> renormalise.

    Returns ``(weights [N, k] f32, experts [N, k] int32, RouterStats)``.
    """
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_e = jax.lax.top_k(probs, top_k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    E = router_w.shape[-1]
    stats = RouterStats(jnp.mean(jax.nn.one_hot(top_e, E, dtype=jnp.float32), axis=0), jnp.mean(probs, axis=0),
                        jnp.zeros((), jnp.float32))
    return top_w, top_e.astype(jnp.int32), stats


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """``E * sum_e f_e P_e`` over all layers' tokens together (stats stacked on a leading layer axis),
    as transformers' ``load_balancing_loss_func``; unscaled (multiply by ``router_aux_loss_coef``).
    ``f_e`` is the fraction of (token, choice) pairs routed to e summed over the k choices, so a
    perfectly uniform router gives ``k``."""
    f = jnp.mean(stats.tokens_per_expert, axis=0) if stats.tokens_per_expert.ndim == 3 else stats.tokens_per_expert
    p = jnp.mean(stats.prob_per_expert, axis=0) if stats.prob_per_expert.ndim == 2 else stats.prob_per_expert
    return p.shape[-1] * jnp.sum(f * p[None, :])


__all__ = ["RouterStats", "route", "load_balancing_loss"]
