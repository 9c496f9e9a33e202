"""Token permutation of the dropless MoE at memory speed: (token, choice) pairs sorted by expert
with a counting sort (no sort kernel), gathers whose gradients are gathers (the inverse
permutation) rather than scatter-adds, and the slots of the capacity dispatch."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

I32 = jnp.int32


class SortedPairs(NamedTuple):
    """Pair ``p`` is token ``p // k``, choice ``p % k``."""

    order: jax.Array  # [M] sorted row r holds pair order[r]
    dest: jax.Array  # [M] the sorted row of pair p (the inverse of order)
    sizes: jax.Array  # [E] rows per expert


def sort_pairs(experts: jax.Array, num_experts: int) -> SortedPairs:
    """Stable counting sort of the pairs by expert: ``experts [N, k]`` int."""
    flat = experts.reshape(-1).astype(I32)
    M = flat.shape[0]
    onehot = (flat[:, None] == jnp.arange(num_experts, dtype=I32)[None, :]).astype(I32)  # [M, E]
    sizes = jnp.sum(onehot, axis=0)
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # earlier pairs of the same expert
    dest = (jnp.cumsum(sizes) - sizes)[flat] + rank
    order = jnp.zeros((M,), I32).at[dest].set(jnp.arange(M, dtype=I32), unique_indices=True)
    return SortedPairs(order, dest.astype(I32), sizes.astype(I32))


@jax.custom_vjp
def permute_rows(a: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """``a[idx]`` for a permutation ``idx`` of ``a``'s rows with inverse ``inv``; the gradient is
    ``g[inv]`` (a gather, not XLA's scatter-add)."""
    return a.at[idx].get(unique_indices=True)


def _permute_fwd(a, idx, inv):
    return permute_rows(a, idx, inv), (idx, inv)


def _permute_bwd(res, g):
    idx, inv = res
    return g.at[inv].get(unique_indices=True), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def dispatch_rows(x: jax.Array, pairs: SortedPairs, top_k: int) -> jax.Array:
    """Token rows ``x [N, H]`` -> one row per pair, sorted by expert ``[N * k, H]``."""
    return permute_rows(jnp.repeat(x, top_k, axis=0), pairs.order, pairs.dest)


def combine_rows(ys: jax.Array, pairs: SortedPairs, weights: jax.Array) -> jax.Array:
    """Expert outputs in sorted order ``ys [N * k, H]`` -> ``sum_j weights[n, j] * y(n, j)`` float32 ``[N, H]``."""
    N, k = weights.shape
    yp = permute_rows(ys, pairs.dest, pairs.order).reshape(N, k, -1)
    return jnp.einsum("nkh,nk->nh", yp.astype(jnp.float32), weights)


def capacity_slots(experts: jax.Array, num_experts: int, capacity: int):
    """Slots of the capacity dispatch, choice-major (all first choices, then all second choices: first
    choices win slots, then token order). Returns ``(slot [k * N] in [0, E * C]``, E * C for a dropped
    pair; ``keep [k * N]`` bool)."""
    flat = experts.T.reshape(-1).astype(I32)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=I32)
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # slot within its expert
    keep = pos < capacity
    return jnp.where(keep, flat * capacity + pos, num_experts * capacity), keep


__all__ = ["SortedPairs", "sort_pairs", "permute_rows", "dispatch_rows", "combine_rows", "capacity_slots"]
