"""The MoE layer and all its implementations, over one expert computation (``experts.expert_ffn``).

``moe_impl``:

* ``"gmm"`` (dropless): sort the (token, choice) pairs by expert, one grouped GEMM per projection
  (``pallas_kernels.moe``: Mosaic GPU kernels on Hopper, megablox on TPU, ``lax.ragged_dot``
  elsewhere; ``moe_backend`` overrides), combine. Every shard holds every expert (the weights are
  gathered over ``expert`` / ``fsdp`` at the shard_map boundary).
* ``"ragged"``: the same with ``lax.ragged_dot`` as the grouped GEMM (the XLA op; on GPU it expands
  into dense products over every expert).
* ``"dense"``: every expert on every token, combined with the (mostly zero) routing weights.
* ``"ep_capacity"``: expert parallel over the ``expert`` mesh axis, fixed ``C`` slots per expert and
  source shard (``moe_capacity_factor``; pairs past it are dropped), dense ``all_to_all``; runs everywhere.
* ``"ep_ragged"``: expert parallel and dropless with ``lax.ragged_all_to_all`` (GPU, TPU).
* ``"auto"``: ``"gmm"``, or with an ``expert`` mesh axis > 1 ``"ep_ragged"`` on GPU/TPU and
  ``"ep_capacity"`` on the CPU.

Decode shapes (``tokens * k <= E / 2`` pairs, e.g. one token in a generation step) skip the sort and
read only the routed experts' weights, so a batch-1 step reads 2 of 32 experts (``moe_decode``: how).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from m1_jax.config import MOE_DECODE, ModelConfig
from m1_jax.model.layers import as_dtype, param
from m1_jax.model.moe.experts import expert_ffn, fuse_gate_up
from m1_jax.model.moe.permute import capacity_slots, combine_rows, dispatch_rows, sort_pairs
from m1_jax.model.moe.router import RouterStats, route
from pallas_kernels.moe import decode_triton, moe_decode
from sharding import moe_dispatch
from sharding.rules import current_mesh, mesh_axis_size

F32 = jnp.float32
_NO_MESH = moe_dispatch.MoELayout(P(), P(), P(), (), (), 1)


def resolve_impl(impl: str, mesh=None) -> str:
    """``"auto"`` -> the implementation for this mesh and platform; other names pass through."""
    if impl != "auto":
        return impl
    ep = mesh_axis_size(moe_dispatch.EXPERT, mesh) if mesh is not None else 1
    if ep > 1:
        return "ep_ragged" if jax.default_backend() in ("gpu", "tpu") else "ep_capacity"
    return "gmm"


def is_decode_shape(num_tokens: int, top_k: int, num_experts: int) -> bool:
    return 2 * num_tokens * top_k <= num_experts


def _tp_sum(y, lay):
    """Partial expert outputs (expert width split over ``tensor``) -> full sums."""
    return lax.psum(y.astype(F32), lay.tensor_axes).astype(y.dtype) if lay.tensor_axes else y


def _dropless(xf, weights, experts, w1, w3, w2, lay, backend, a2a, fuse):
    E = w1.shape[0] * lay.ep
    N, k = experts.shape
    pairs = sort_pairs(experts, E)
    xs = dispatch_rows(xf, pairs, k)
    if lay.ep == 1:
        ys = _tp_sum(expert_ffn(xs, w1, w3, w2, pairs.sizes, backend=backend, fuse=fuse), lay)
    else:
        plan = moe_dispatch.ragged_plan(pairs.sizes, lay.ep, N * k)
        xl = moe_dispatch.ragged_dispatch(xs, plan, a2a=a2a)
        yl = _tp_sum(expert_ffn(xl, w1, w3, w2, plan.local_sizes, backend=backend, fuse=fuse), lay)
        ys = moe_dispatch.ragged_return(yl, plan, N * k, a2a=a2a)
    return combine_rows(ys, pairs, weights)


DECODE_PRODUCTS = MOE_DECODE  # "batched", "grouped", "fused", "fused_gathered"


def _fused_decode_runs(w1) -> bool:
    """Whether the ``"fused"`` decode products run their kernels here: Triton-lowered, so on GPUs (and on the
    CPU in the Pallas interpreter, for tests), for feature sizes in multiples of 8; otherwise ``"batched"``."""
    return jax.default_backend() in ("gpu", "cpu") and decode_triton.supported(w1.shape[1], w1.shape[2])


def _decode(xf, weights, experts, w1, w3, w2, lay, backend, dt, products="batched"):
    """Only the routed experts are read:

    * ``"batched"`` / ``"grouped"``: each pair's expert weights gathered, then batched matrix-vector products
      or one grouped GEMM of one-row groups;
    * ``"fused"``: two kernels (``pallas_kernels.moe.moe_decode``) that read the routed experts' columns in
      place and combine the pairs;
    * ``"fused_gathered"``: the same kernels on the gathered weights. Inside the scan over blocks the weights
      are a per-block slice of the stacked parameters, which XLA may copy whole for a kernel's operand
      unless it fuses the slice into the call; a gather takes the slice into its own fusion, so this form
      never copies more than the routed experts.
    """
    N, k = experts.shape
    if products in ("fused", "fused_gathered") and _fused_decode_runs(w1):
        interpret = jax.default_backend() == "cpu"
        if products == "fused":
            y = moe_decode(xf, w1, w3, w2, experts, weights, interpret)
        else:
            flat = experts.reshape(-1)
            pair = jnp.arange(N * k, dtype=jnp.int32).reshape(N, k)  # pair p uses gathered expert p
            y = moe_decode(xf, w1[flat], w3[flat], w2[flat], pair, weights, interpret)
        return _tp_sum(y, lay)
    flat = experts.reshape(-1)
    w1g, w3g, w2g = (w[flat].astype(dt) for w in (w1, w3, w2))
    xs = jnp.repeat(xf, k, axis=0)
    # The gather writes a copy anyway and the concatenation rides on it: gate and up as one product
    # (H200, small, batch 1: 0.516 ms for the 16 layers fused against 0.557 ms as two products).
    if products == "batched":
        ys = expert_ffn(xs[:, None, :], w1g, w3g, w2g, fuse=True)[:, 0]
    else:
        ys = expert_ffn(xs, w1g, w3g, w2g, jnp.ones((N * k,), jnp.int32), backend=backend, fuse=True)
    ys = _tp_sum(ys, lay)
    return jnp.einsum("nkh,nk->nh", ys.reshape(N, k, -1).astype(F32), weights)


def _capacity(xf, weights, experts, w1, w3, w2, lay, capacity_factor, fuse):
    e_loc = w1.shape[0]
    E = e_loc * lay.ep
    N, k = experts.shape
    H = xf.shape[1]
    C = moe_dispatch.capacity(N, E, k, capacity_factor)
    slot, keep = capacity_slots(experts, E, C)
    tok = jnp.tile(jnp.arange(N), k)
    buf = jnp.zeros((E * C + 1, H), xf.dtype).at[slot].add(xf[tok])[: E * C]  # one pair per slot
    xe = moe_dispatch.capacity_exchange(buf.reshape(lay.ep, e_loc, C, H))  # [E_loc, ep * C, H]
    ye = _tp_sum(expert_ffn(xe, w1, w3, w2, fuse=fuse), lay)
    ye = jnp.concatenate([moe_dispatch.capacity_return(ye, lay.ep), jnp.zeros((1, H), ye.dtype)], axis=0)
    yk = ye[slot].astype(F32).reshape(k, N, H)
    y = jnp.einsum("knh,nk->nh", yk, weights * keep.reshape(k, N).T.astype(F32))
    return y, jnp.mean((~keep).astype(F32))


def moe_forward(x, gate, w1, w3, w2, *, impl: str, top_k: int, backend: str = "auto",
                capacity_factor: float = 1.25, dtype=None, mesh=None, a2a=None, decode_products: str = "batched",
                fuse: bool | None = None):
    """The MoE on ``x [B, T, H]``: router ``gate [H, E]``, experts ``w1, w3 [E, H, I]``, ``w2 [E, I, H]``
    (any dtype; computed in ``dtype``, default x's). Runs on the mesh of ``jax.set_mesh`` (shard_map
    over the token axes; ``mesh`` overrides) or on one device without one. ``a2a`` replaces
    ``lax.ragged_all_to_all`` for ``"ep_ragged"`` (tests pass ``moe_dispatch.ragged_all_to_all_emulated``).

    ``decode_products`` picks the expert products at decode shapes (``DECODE_PRODUCTS``). ``fuse``: gate
    and up projections as one product over concatenated weights (True) or two (False); None decides by
    ``experts.fuse_gate_up`` (fused when the weights are cast anyway or the products are compute-bound).
    The gathered decode path always fuses: its gather writes a copy anyway.

    Returns ``(y [B, T, H] in x's dtype, RouterStats)``.
    """
    if decode_products not in DECODE_PRODUCTS:
        raise ValueError(f"decode_products must be one of {DECODE_PRODUCTS}, got {decode_products!r}")
    mesh = current_mesh() if mesh is None else mesh
    impl = resolve_impl(impl, mesh)
    dt = jnp.dtype(dtype or x.dtype)
    B, T, H = x.shape
    E = w1.shape[0]
    if impl == "dense":  # GSPMD: plain einsums over every expert
        xf = x.reshape(B * T, H)
        weights, experts, stats = route(xf, gate, top_k)
        combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, E, dtype=F32))
        if fuse is None:
            fuse = fuse_gate_up(w1.dtype, dt, B * T)
        ye = expert_ffn(xf.astype(dt), w1, w3, w2, fuse=fuse)  # [E, N, H]
        y = jnp.einsum("enh,ne->nh", ye.astype(F32), combine)
        return y.astype(x.dtype).reshape(B, T, H), stats
    expert_parallel = impl in ("ep_capacity", "ep_ragged")
    decode = not expert_parallel and is_decode_shape(B * T, top_k, E)
    if fuse is None:
        fuse = fuse_gate_up(w1.dtype, dt, B * T * top_k / E)
    if not decode:  # the decode path gathers its experts before casting
        w1, w3, w2 = (w.astype(dt) for w in (w1, w3, w2))
    backend = "xla" if impl == "ragged" else backend

    def local(x, gate, w1, w3, w2, lay):
        Bl, Tl, _ = x.shape
        xf = x.reshape(Bl * Tl, H).astype(dt)
        weights, experts, stats = route(xf, gate, top_k)
        dropped = jnp.zeros((), F32)
        if impl == "ep_capacity":
            y, dropped = _capacity(xf, weights, experts, w1, w3, w2, lay, capacity_factor, fuse)
        elif decode:
            y = _decode(xf, weights, experts, w1, w3, w2, lay, backend, dt, decode_products)
        else:
            y = _dropless(xf, weights, experts, w1, w3, w2, lay, backend, a2a, fuse)
        if lay.token_axes:
            stats = jax.tree.map(lambda s: lax.pmean(s, lay.token_axes), stats)
            dropped = lax.pmean(dropped, lay.token_axes)
        return y.astype(x.dtype).reshape(Bl, Tl, H), stats, dropped

    if mesh is None:
        y, stats, dropped = local(x, gate, w1, w3, w2, _NO_MESH)
    else:
        lay = moe_dispatch.layout(x.shape, w1.shape, mesh, expert_parallel=expert_parallel)
        f = jax.shard_map(functools.partial(local, lay=lay), mesh=mesh, in_specs=(lay.x, P(), lay.w13, lay.w13, lay.w2),
                          out_specs=(lay.x, P(), P()), check_vma=False)
        y, stats, dropped = f(x, gate, w1, w3, w2)
    return y, stats._replace(dropped_fraction=dropped)


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
        return moe_forward(x, self.gate.value, self.w1.value, self.w3.value, self.w2.value, impl=c.moe_impl,
                           top_k=c.num_experts_per_tok, backend=c.moe_backend, capacity_factor=c.moe_capacity_factor,
                           decode_products=c.moe_decode)


__all__ = ["MoE", "moe_forward", "resolve_impl", "is_decode_shape"]
