"""Expert-parallel token transport for the MoE layer, inside ``jax.shard_map``.

The MoE layer (``m1_jax.model.moe``) routes, sorts its (token, choice) pairs, runs the experts
(one grouped GEMM) and combines; this module only says how the layer's arrays are split over the
mesh (``layout``) and moves rows between the shards of the ``expert`` axis. Outside the MoE the
``expert`` axis is a data axis (tokens are sharded over ``data, fsdp, expert, context``); inside
it, it shards the experts. Two transports:

* capacity (static shapes, every platform, CPU included): each shard sends every expert a buffer
  of ``C`` slots (``capacity``) with one dense ``all_to_all`` (``capacity_exchange``) and gets the
  results back with the mirror one (``capacity_return``);
* ragged (dropless, GPU/TPU): ``ragged_plan`` exchanges the per-expert counts (``all_gather``),
  ``ragged_dispatch`` ships exactly the rows each shard needs with ``lax.ragged_all_to_all`` and
  groups them by local expert, ``ragged_return`` sends the results back into the senders' rows.
  The receive buffer is sized for the worst case (``ep`` x the rows a shard sends).
  ``ragged_all_to_all`` is not implemented on XLA:CPU: ``ragged_all_to_all_emulated`` builds it
  from a dense ``all_to_all`` for tests.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_to_mesh_spec, mesh_axis_size

EXPERT = "expert"
TENSOR = "tensor"


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(spec: P, i: int):
    return spec[i] if i < len(spec) else None


class MoELayout(NamedTuple):
    """shard_map specs of the MoE inputs and the mesh axes the layer reduces over."""

    x: P  # tokens [B, T, H]
    w13: P  # w1, w3 [E, H, I]
    w2: P  # w2 [E, I, H]
    token_axes: tuple[str, ...]  # tokens are split over these (router statistics: pmean)
    tensor_axes: tuple[str, ...]  # the expert width I is split over these (expert outputs: psum)
    ep: int  # expert shards (1: every shard holds every expert)


def layout(x_shape, w1_shape, mesh, *, expert_parallel: bool) -> MoELayout:
    """Specs from the logical-axis rules. ``expert_parallel=False`` keeps every expert on every shard
    (the weights are gathered over ``expert`` at the shard_map boundary)."""
    xspec = logical_to_mesh_spec(("activation_batch", "activation_length", None), x_shape, mesh)
    wspec = logical_to_mesh_spec(("activation_exp", None, "activation_mlp"), w1_shape, mesh)
    ep = mesh_axis_size(EXPERT, mesh) if expert_parallel else 1
    if ep > 1 and _entry(wspec, 0) != EXPERT:
        raise ValueError(f"expert parallelism: num_local_experts = {w1_shape[0]} is not divisible by the "
                         f"expert axis size {ep}")
    exp = _entry(wspec, 0) if ep > 1 else None
    mlp = _entry(wspec, 2)
    return MoELayout(P(_entry(xspec, 0), _entry(xspec, 1), None), P(exp, None, mlp), P(exp, mlp, None),
                     _axes(_entry(xspec, 0)) + _axes(_entry(xspec, 1)), _axes(mlp), ep)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per source shard: ``ceil(capacity_factor * tokens * k / E)``, at least 1 and at
    most ``num_tokens``; ``capacity_factor <= 0`` means dropless (``num_tokens``)."""
    if capacity_factor <= 0:
        return num_tokens
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


# ------------------------------------------------------------------------------------ capacity
def capacity_exchange(buf):
    """``buf [ep, E_loc, C, H]`` (this shard's slots for every expert, by owning shard) ->
    ``[E_loc, ep * C, H]``: every source shard's slots for this shard's experts."""
    ep, e_loc, c, h = buf.shape
    if ep > 1:
        buf = lax.all_to_all(buf, EXPERT, 0, 0, tiled=True)  # [source shard, E_loc, C, H]
    return buf.transpose(1, 0, 2, 3).reshape(e_loc, ep * c, h)


def capacity_return(ye, ep: int):
    """Mirror of ``capacity_exchange``: ``[E_loc, ep * C, H]`` -> ``[ep * E_loc * C, H]`` in the
    sender's slot order (expert-major)."""
    e_loc, rows, h = ye.shape
    c = rows // ep
    ye = ye.reshape(e_loc, ep, c, h).transpose(1, 0, 2, 3)
    if ep > 1:
        ye = lax.all_to_all(ye, EXPERT, 0, 0, tiled=True)  # back to the owners of the tokens
    return ye.reshape(ep * e_loc * c, h)


# ------------------------------------------------------------------------------------ ragged
class RaggedPlan(NamedTuple):
    send_sizes: jax.Array  # [ep] rows I send to each shard
    input_offsets: jax.Array  # [ep] where they start in my sorted rows
    output_offsets: jax.Array  # [ep] where they land in each target's receive buffer
    recv_sizes: jax.Array  # [ep] rows I receive from each source
    back_offsets: jax.Array  # [ep] where each source's rows sit in my receive buffer
    home_offsets: jax.Array  # [ep] where my results land back in each source's rows
    local_order: jax.Array  # [R] receive-buffer row of the i-th row grouped by local expert
    local_inverse: jax.Array  # [R] its inverse
    local_sizes: jax.Array  # [E_loc] rows per local expert


def ragged_plan(sizes, ep: int, rows: int) -> RaggedPlan:
    """From this shard's per-expert counts ``sizes [E]`` (rows sorted by expert, ``rows`` of them):
    exchange the counts over ``expert`` and compute every offset of both exchanges."""
    E = sizes.shape[0]
    e_loc = E // ep
    me = lax.axis_index(EXPERT)
    counts = lax.all_gather(sizes.astype(jnp.int32), EXPERT).reshape(ep, ep, e_loc)  # [source, target, local]
    per_target = counts.sum(-1)  # [source, target]
    send_sizes = per_target[me]
    before = jnp.cumsum(per_target, axis=0) - per_target  # rows of lower-ranked sources, per target
    R = rows * ep
    mine = counts[:, me, :]  # [source, E_loc]: what I receive, per source and local expert
    seg_expert = jnp.tile(jnp.arange(e_loc, dtype=jnp.int32), ep)
    row_expert = jnp.repeat(seg_expert, mine.reshape(-1), total_repeat_length=R)
    row_expert = jnp.where(jnp.arange(R) < jnp.sum(mine), row_expert, e_loc)  # unused rows last
    order = jnp.argsort(row_expert, stable=True).astype(jnp.int32)
    inverse = jnp.zeros((R,), jnp.int32).at[order].set(jnp.arange(R, dtype=jnp.int32), unique_indices=True)
    return RaggedPlan(send_sizes, jnp.cumsum(send_sizes) - send_sizes, before[me], per_target[:, me],
                      before[:, me], (jnp.cumsum(per_target, axis=1) - per_target)[:, me], order, inverse,
                      jnp.sum(mine, axis=0).astype(jnp.int32))


def ragged_dispatch(xs, plan: RaggedPlan, *, a2a=None):
    """Rows ``xs [M, H]`` sorted by expert -> the rows of this shard's experts ``[ep * M, H]``, grouped by
    local expert (``plan.local_sizes``; unused rows last, zero)."""
    a2a = lax.ragged_all_to_all if a2a is None else a2a
    R = plan.local_order.shape[0]
    recv = a2a(xs, jnp.zeros((R, xs.shape[1]), xs.dtype), plan.input_offsets, plan.send_sizes,
               plan.output_offsets, plan.recv_sizes, axis_name=EXPERT)
    return recv.at[plan.local_order].get(unique_indices=True)


def ragged_return(ys, plan: RaggedPlan, rows: int, *, a2a=None):
    """Mirror of ``ragged_dispatch``: expert outputs ``[ep * M, H]`` grouped by local expert -> ``[M, H]``
    in the order of this shard's sorted rows."""
    a2a = lax.ragged_all_to_all if a2a is None else a2a
    yr = ys.at[plan.local_inverse].get(unique_indices=True)  # back to receive order
    return a2a(yr, jnp.zeros((rows, ys.shape[1]), ys.dtype), plan.back_offsets, plan.recv_sizes,
               plan.home_offsets, plan.send_sizes, axis_name=EXPERT)


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


__all__ = ["MoELayout", "layout", "capacity", "capacity_exchange", "capacity_return", "RaggedPlan", "ragged_plan",
           "ragged_dispatch", "ragged_return", "ragged_all_to_all_emulated", "EXPERT", "TENSOR"]
