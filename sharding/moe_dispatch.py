"""Expert-parallel MoE dispatch under ``jax.shard_map``.

The ``expert`` mesh axis acts as a data axis outside the MoE (tokens are sharded over
``data, fsdp, expert, context``) and shards the experts inside it. Per shard:

1. route the local tokens (the caller's ``route_fn``: float32 softmax, top-k, renormalise);
2. move each (token, choice) pair to the shard that owns its expert with an all-to-all over ``expert``;
3. run the local experts (expert width ``I`` sharded over ``tensor``, summed with a ``psum``);
4. send the results back with the mirror all-to-all and combine them with the routing weights.

Two transports:

* :func:`moe_capacity` — static shapes, runs everywhere (CPU included). Each shard sends every
  expert a buffer of ``C = ceil(capacity_factor * N_local * k / E)`` slots (``capacity_factor <= 0``:
  ``C = N_local``, never drops). Pairs past the capacity are dropped (their contribution is zero);
  first choices have priority over second choices, then token order. The fraction of dropped pairs
  is returned as a metric.
* :func:`moe_ragged` — dropless: pairs sorted by expert, ``lax.ragged_all_to_all`` ships exactly the
  pairs each shard needs, grouped matmuls (``lax.ragged_dot``) on the local experts. The receive
  buffer is sized for the worst case (``ep * N_local * k`` rows). ``ragged_all_to_all`` is implemented
  on GPU and TPU, not on XLA:CPU.

Both take global arrays and run on the mesh from ``jax.set_mesh``; with no mesh they run the same
local computation on one device (no collectives).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from sharding.rules import current_mesh, logical_to_mesh_spec, mesh_axis_size

EXPERT = "expert"
TENSOR = "tensor"

RouteFn = Callable  # (x [N, H], gate [H, E], top_k) -> (weights [N, k] f32, experts [N, k] i32, stats)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(spec: P, i: int):
    return spec[i] if i < len(spec) else None


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per source shard. ``capacity_factor <= 0`` means dropless (``num_tokens``)."""
    if capacity_factor <= 0:
        return num_tokens
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def _swiglu_grouped(xe, w1, w3, w2):
    """``xe [E_loc, n, H]`` through the local experts; f32 accumulation, x's dtype out."""
    h = jax.nn.silu(jnp.einsum("enh,ehi->eni", xe, w1)) * jnp.einsum("enh,ehi->eni", xe, w3)
    return jnp.einsum("eni,eih->enh", h, w2, preferred_element_type=jnp.float32)


def _layout(x, w1, mesh):
    """Shard-map specs for tokens and expert weights, and which axes the tokens are split over."""
    xspec = logical_to_mesh_spec(("activation_batch", "activation_length", None), x.shape, mesh)
    wspec = logical_to_mesh_spec(("activation_exp", None, "activation_mlp"), w1.shape, mesh)
    ep = mesh_axis_size(EXPERT, mesh)
    if ep > 1 and _entry(wspec, 0) != EXPERT:
        raise ValueError(f"expert parallelism: num_local_experts = {w1.shape[0]} is not divisible by the "
                         f"expert axis size {ep}")
    token_axes = _axes(_entry(xspec, 0)) + _axes(_entry(xspec, 1))
    tp_axes = _axes(_entry(wspec, 2))
    w13 = P(_entry(wspec, 0), None, _entry(wspec, 2))
    w2s = P(_entry(wspec, 0), _entry(wspec, 2), None)
    return P(_entry(xspec, 0), _entry(xspec, 1), None), w13, w2s, token_axes, tp_axes, ep


def _run(local, x, gate, w1, w3, w2, mesh, out_extra):
    """Run ``local`` under shard_map (or directly without a mesh)."""
    if mesh is None:
        return local(x, gate, w1, w3, w2, (), (), 1)
    xs, w13, w2s, token_axes, tp_axes, ep = _layout(x, w1, mesh)
    fn = lambda x, g, a, b, c: local(x, g, a, b, c, token_axes, tp_axes, ep)  # noqa: E731
    f = jax.shard_map(fn, mesh=mesh, in_specs=(xs, P(), w13, w13, w2s),
                      out_specs=(xs,) + out_extra, check_vma=False)
    return f(x, gate, w1, w3, w2)


def _global_stats(stats, dropped, token_axes):
    if token_axes:
        stats = jax.tree.map(lambda s: lax.pmean(s, token_axes), stats)
        dropped = lax.pmean(dropped, token_axes)
    return stats, dropped


def moe_capacity(x, gate, w1, w3, w2, *, route_fn: RouteFn, top_k: int, capacity_factor: float = 1.25,
                 mesh=None):
    """Capacity-based expert-parallel MoE. ``x [B, T, H]``; ``gate [H, E]``; ``w1, w3 [E, H, I]``;
    ``w2 [E, I, H]`` (already in the compute dtype). Returns ``(y [B, T, H], stats, dropped_fraction)``."""
    mesh = current_mesh() if mesh is None else mesh
    E = w1.shape[0]

    def local(x, gate, w1, w3, w2, token_axes, tp_axes, ep):
        B, T, H = x.shape
        N = B * T
        xf = x.reshape(N, H)
        weights, experts, stats = route_fn(xf, gate, top_k)
        C = capacity(N, E, top_k, capacity_factor)
        E_loc = E // ep
        # choice-major order: all first choices, then all second choices (first choices win slots)
        flat_e = experts.T.reshape(-1)  # [k*N]
        tok = jnp.tile(jnp.arange(N), top_k)
        onehot = jax.nn.one_hot(flat_e, E, dtype=jnp.int32)
        pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # slot within its expert
        keep = pos < C
        dest = jnp.where(keep, flat_e * C + pos, E * C)
        buf = jnp.zeros((E * C + 1, H), x.dtype).at[dest].add(xf[tok])[: E * C]
        buf = buf.reshape(ep, E_loc, C, H)
        if ep > 1:
            buf = lax.all_to_all(buf, EXPERT, 0, 0, tiled=True)  # [source shard, E_loc, C, H]
        xe = buf.transpose(1, 0, 2, 3).reshape(E_loc, ep * C, H)
        ye = _swiglu_grouped(xe, w1, w3, w2)
        if tp_axes:
            ye = lax.psum(ye, tp_axes)
        ye = ye.astype(x.dtype).reshape(E_loc, ep, C, H).transpose(1, 0, 2, 3)
        if ep > 1:
            ye = lax.all_to_all(ye, EXPERT, 0, 0, tiled=True)  # back to the owners of the tokens
        ye = jnp.concatenate([ye.reshape(E * C, H), jnp.zeros((1, H), ye.dtype)], axis=0)
        yk = ye[dest].astype(jnp.float32).reshape(top_k, N, H)
        y = jnp.einsum("knh,nk->nh", yk, weights * keep.reshape(top_k, N).T.astype(jnp.float32))
        dropped = 1.0 - jnp.mean(keep.astype(jnp.float32))
        stats, dropped = _global_stats(stats, dropped, token_axes)
        return y.astype(x.dtype).reshape(B, T, H), stats, dropped

    return _run(local, x, gate, w1, w3, w2, mesh, (P(), P()))


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``lax.ragged_all_to_all`` built from a dense ``all_to_all`` (each shard sends ``rows(operand)``
    slots to every peer). Same semantics; for checking the dropless path where the real collective is
    missing (XLA:CPU), not for speed."""
    M, H = operand.shape
    R = output.shape[0]
    i = jnp.arange(M)
    valid = i[None, :] < send_sizes[:, None]  # [peers, M]
    src = jnp.clip(input_offsets[:, None] + i[None, :], 0, M - 1)
    send = jnp.where(valid[..., None], operand[src], 0)  # [peers, M, H]
    recv = lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # [sources, M, H]
    offs = lax.all_to_all(output_offsets[:, None], axis_name, 0, 0, tiled=True)[:, 0]  # source's offset for me
    ok = i[None, :] < recv_sizes[:, None]
    dst = jnp.where(ok, offs[:, None] + i[None, :], R)
    return output.at[dst.reshape(-1)].set(recv.reshape(-1, H), mode="drop")


def moe_ragged(x, gate, w1, w3, w2, *, route_fn: RouteFn, top_k: int, mesh=None, a2a=None):
    """Dropless expert-parallel MoE with ``lax.ragged_all_to_all`` (GPU/TPU). Same interface as
    :func:`moe_capacity` (the dropped fraction is always 0). ``a2a`` replaces the collective (tests pass
    :func:`ragged_all_to_all_emulated` on CPU)."""
    mesh = current_mesh() if mesh is None else mesh
    a2a = lax.ragged_all_to_all if a2a is None else a2a
    E = w1.shape[0]

    def local(x, gate, w1, w3, w2, token_axes, tp_axes, ep):
        B, T, H = x.shape
        N = B * T
        M = N * top_k
        xf = x.reshape(N, H)
        weights, experts, stats = route_fn(xf, gate, top_k)
        E_loc = E // ep
        flat_e = experts.reshape(-1)  # token-major [N*k]
        order = jnp.argsort(flat_e, stable=True)
        xs = xf[order // top_k]  # [M, H] sorted by expert
        sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)  # [E]
        if ep == 1:
            h = jax.nn.silu(lax.ragged_dot(xs, w1, sizes)) * lax.ragged_dot(xs, w3, sizes)
            ys = lax.ragged_dot(h, w2, sizes, preferred_element_type=jnp.float32)
            if tp_axes:
                ys = lax.psum(ys, tp_axes)
            dropped = jnp.zeros((), jnp.float32)
        else:
            me = lax.axis_index(EXPERT)
            G = lax.all_gather(sizes, EXPERT)  # [ep, E]: every shard's per-expert counts
            Gs = G.reshape(ep, ep, E_loc)  # [source, target shard, local expert]
            per_target = Gs.sum(-1)  # [source, target]
            send_sizes = per_target[me]
            input_offsets = jnp.cumsum(send_sizes) - send_sizes
            # where my rows land in each target's buffer: after the rows of lower-ranked sources
            before = jnp.cumsum(per_target, axis=0) - per_target  # [source, target]
            output_offsets = before[me]
            recv_sizes = per_target[:, me]
            R = M * ep  # worst case: every source sends all its pairs to this shard
            recv = a2a(xs, jnp.zeros((R, H), xs.dtype), input_offsets, send_sizes, output_offsets, recv_sizes,
                       axis_name=EXPERT)
            # local expert of every received row (sources in rank order, each sorted by local expert)
            mine = Gs[:, me, :]  # [source, E_loc]
            seg_sizes = mine.reshape(-1)
            seg_expert = jnp.tile(jnp.arange(E_loc, dtype=jnp.int32), ep)
            row_expert = jnp.repeat(seg_expert, seg_sizes, total_repeat_length=R)
            valid = jnp.arange(R) < jnp.sum(seg_sizes)
            row_expert = jnp.where(valid, row_expert, E_loc)
            lorder = jnp.argsort(row_expert, stable=True)
            lsizes = jnp.sum(mine, axis=0).astype(jnp.int32)
            xl = recv[lorder]
            h = jax.nn.silu(lax.ragged_dot(xl, w1, lsizes)) * lax.ragged_dot(xl, w3, lsizes)
            yl = lax.ragged_dot(h, w2, lsizes, preferred_element_type=jnp.float32)
            if tp_axes:
                yl = lax.psum(yl, tp_axes)
            yl = jnp.where((jnp.arange(R) < jnp.sum(lsizes))[:, None], yl, 0.0).astype(x.dtype)
            yr = jnp.zeros_like(yl).at[lorder].set(yl)  # back to receive order
            # mirror exchange: return rows to their sources, into the slots they were sent from
            back_in_offsets = before[:, me]
            back_out_offsets = (jnp.cumsum(per_target, axis=1) - per_target)[:, me]
            ys = a2a(yr, jnp.zeros((M, H), yr.dtype), back_in_offsets, recv_sizes, back_out_offsets, send_sizes,
                     axis_name=EXPERT)
            ys = ys.astype(jnp.float32)
            dropped = jnp.zeros((), jnp.float32)
        y = jnp.zeros((M, H), jnp.float32).at[order].set(ys).reshape(N, top_k, H)
        y = jnp.einsum("nkh,nk->nh", y, weights)
        stats, dropped = _global_stats(stats, dropped, token_axes)
        return y.astype(x.dtype).reshape(B, T, H), stats, dropped

    return _run(local, x, gate, w1, w3, w2, mesh, (P(), P()))


__all__ = ["capacity", "moe_capacity", "moe_ragged", "ragged_all_to_all_emulated"]
