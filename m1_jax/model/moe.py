"""Mixture of Experts: float32 softmax router, top-k with renormalised weights, SwiGLU experts, dropless."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax.config import ModelConfig
from m1_jax.model.layers import as_dtype, param
from sharding import moe_dispatch


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
    as transformers' ``load_balancing_loss_func``; unscaled (multiply by ``router_aux_loss_coef``)."""
    f = jnp.mean(stats.tokens_per_expert, axis=0) if stats.tokens_per_expert.ndim == 3 else stats.tokens_per_expert
    p = jnp.mean(stats.prob_per_expert, axis=0) if stats.prob_per_expert.ndim == 2 else stats.prob_per_expert
    return p.shape[-1] * jnp.sum(f * p[None, :])


def swiglu(x, w1, w3, w2):
    h = jax.nn.silu(x @ w1) * (x @ w3)
    return h @ w2


def experts_ragged(x, weights, experts, w1, w3, w2):
    """Dropless: sort the (token, choice) pairs by expert and run grouped matmuls (``lax.ragged_dot``)."""
    N, H = x.shape
    k = experts.shape[1]
    E = w1.shape[0]
    flat_e = experts.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    xs = jnp.take(x, order // k, axis=0)  # [N*k, H] sorted by expert
    group_sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)
    ys = jax.lax.ragged_dot(h, w2, group_sizes)  # [N*k, H]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(N, k, H)
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights).astype(x.dtype)


def experts_dense(x, weights, experts, w1, w3, w2):
    """Every expert on every token, combined with the (mostly zero) routing weights. For tiny configs."""
    E = w1.shape[0]
    combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, E, dtype=jnp.float32))
    h = jax.nn.silu(jnp.einsum("nh,ehi->eni", x, w1)) * jnp.einsum("nh,ehi->eni", x, w3)
    y = jnp.einsum("eni,eih->enh", h, w2)
    return jnp.einsum("enh,ne->nh", y.astype(jnp.float32), combine).astype(x.dtype)


_EXPERT_IMPLS = {"ragged": experts_ragged, "dense": experts_dense}
# Expert-parallel implementations: they route inside shard_map and return (y, stats, dropped_fraction).
_EP_IMPLS = {"ep_capacity": moe_dispatch.moe_capacity, "ep_ragged": moe_dispatch.moe_ragged}


class MoE(nnx.Module):
    """``block_sparse_moe``: router ``gate [hidden, E]`` (float32) and stacked experts
    ``w1, w3 [E, hidden, I]`` (gate, up) and ``w2 [E, I, hidden]`` (down)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt = as_dtype(c.param_dtype)
        E, h, i = c.num_local_experts, c.hidden_size, c.intermediate_size
        std = c.initializer_range
        self.gate = param(rngs, (h, E), ("embed", None), jnp.float32, std=std)
        self.w1 = param(rngs, (E, h, i), ("exp", "embed", "mlp"), pdt, std=std)
        self.w3 = param(rngs, (E, h, i), ("exp", "embed", "mlp"), pdt, std=std)
        self.w2 = param(rngs, (E, i, h), ("exp", "mlp", "embed"), pdt, std=std)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, RouterStats]:
        c = self.config
        B, T, H = x.shape
        dt = x.dtype
        if c.moe_impl in _EP_IMPLS:
            kw = dict(capacity_factor=c.moe_capacity_factor) if c.moe_impl == "ep_capacity" else {}
            y, stats, dropped = _EP_IMPLS[c.moe_impl](
                x, self.gate.value, self.w1.value.astype(dt), self.w3.value.astype(dt), self.w2.value.astype(dt),
                route_fn=route, top_k=c.num_experts_per_tok, **kw)
            return y, stats._replace(dropped_fraction=dropped)
        xf = x.reshape(B * T, H)
        weights, experts, stats = route(xf, self.gate.value, c.num_experts_per_tok)
        y = _EXPERT_IMPLS[c.moe_impl](xf, weights, experts, self.w1.value.astype(dt),
                                      self.w3.value.astype(dt), self.w2.value.astype(dt))
        return y.reshape(B, T, H), stats
