"""One table from logical axis names to mesh axes, and the helpers that apply it.

Every parameter carries logical names (``nnx.Param(..., sharding_names=(...))``); the main activations
are annotated with :func:`constrain`. :data:`RULES` maps each name to an ordered tuple of mesh axes.
Resolution for one tensor (:func:`logical_to_mesh_spec`), dimension by dimension:

* the dimension gets the rule's mesh axes in order, skipping axes of size 1, axes already used by an
  earlier dimension of the same tensor, and axes whose size would no longer divide the dimension
  (so ``kv_heads = 2`` on ``tensor = 4`` is replicated rather than an error);
* names without a rule (and ``None``) are replicated.

Layout this table gives (``docs/sharding.md`` has the reasoning):

* parameters: ``embed`` over ``fsdp, context, expert`` (ZeRO-3 style; the expert and context axes
  act as extra FSDP axes outside the MoE and attention cores), ``heads / kv_heads / mlp / vocab`` over
  ``tensor`` (Megatron tensor parallelism), ``exp`` over ``expert`` (expert weights then take ``embed``
  over ``fsdp, context`` only); replicated over ``data``;
* activations: batch over ``data, fsdp, expert``, sequence over ``context``, heads over ``tensor``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sharding.mesh import AXES

Rules = tuple[tuple[str, tuple[str, ...]], ...]

RULES: Rules = (
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", ("context",)),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
    ("activation_exp", ("expert",)),
    # parameters
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "context", "expert")),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("exp", ("expert",)),
    ("head_dim", ()),
    ("norm", ()),
    ("layers", ()),
)

# Tokens (batch x sequence) are sharded over these axes everywhere outside tensor-parallel cores.
TOKEN_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "context")

_active_rules: list[Rules] = [RULES]


def current_rules() -> Rules:
    return _active_rules[-1]


@contextlib.contextmanager
def use_rules(rules: Rules | Iterable[tuple[str, Sequence[str]]]):
    """Temporarily replace the rules table (e.g. a mesh recipe that shards ``embed`` differently)."""
    table = tuple((name, tuple(axes) if not isinstance(axes, str) else (axes,)) for name, axes in rules)
    for _, axes in table:
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ValueError(f"use_rules: unknown mesh axes {bad}; expected names from {AXES}")
    _active_rules.append(table)
    try:
        yield table
    finally:
        _active_rules.pop()


def _lookup(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for n, axes in rules:
        if n == name:
            return axes
    return ()


def _axis_sizes(mesh) -> dict[str, int]:
    if mesh is None:
        return {}
    return {str(a): int(s) for a, s in dict(mesh.shape).items()}


def logical_to_mesh_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                         mesh=None, rules: Rules | None = None) -> P:
    """``PartitionSpec`` of a tensor with these logical axis names on ``mesh``.

    With ``mesh`` given, axes of size 1 and axes the mesh lacks are dropped; with ``shape`` given,
    axes that would not divide the dimension are dropped too. Without a mesh the full rule is used.
    """
    rules = current_rules() if rules is None else rules
    sizes = _axis_sizes(mesh)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical_to_mesh_spec: {len(logical_axes)} names {tuple(logical_axes)} for a "
                         f"{len(shape)}-d shape {tuple(shape)}")
    used: set[str] = set()
    out: list[Any] = []
    for d, name in enumerate(logical_axes):
        chosen: list[str] = []
        prod = 1
        for a in _lookup(name, rules):
            if a in used:
                continue
            if mesh is not None:
                s = sizes.get(a, 1)
                if s == 1:
                    continue
                if shape is not None and shape[d] % (prod * s):
                    continue
                prod *= s
            chosen.append(a)
            used.add(a)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_sharding(mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                     rules: Rules | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, shape, mesh, rules))


# ------------------------------------------------------------------------------------- nnx states
def variable_logical_axes(var) -> tuple | None:
    """The logical axis names stored on an ``nnx.Variable`` (``sharding_names`` / ``out_sharding``)."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _variable_spec(x, mesh, rules) -> P:
    """The mesh spec of one Variable from its logical names (replicated when it has none)."""
    names = variable_logical_axes(x)
    shape = getattr(x.value, "shape", ())
    if names is None or len(names) != len(shape):
        return P()
    return logical_to_mesh_spec(names, shape, mesh, rules)


def state_specs(state, mesh=None, rules: Rules | None = None):
    """Like :func:`state_shardings` but with ``PartitionSpec`` leaves."""

    def one(x):
        return x.replace(_variable_spec(x, mesh, rules)) if _is_variable(x) else P()

    return jax.tree.map(one, state, is_leaf=_is_variable)


def state_shardings(state, mesh, rules: Rules | None = None):
    """``NamedSharding`` for every leaf of an nnx state (or any pytree of Variables / arrays).

    Variables with logical names are sharded by the rules; everything else (optimizer step counts,
    RNG keys, unnamed variables, plain arrays) is replicated. The result has the state's tree structure
    (each Variable's value replaced by its sharding), so it can be passed as ``jax.jit``
    ``in_shardings`` / ``out_shardings`` for that state, and to ``jax.device_put``. Works on abstract
    states (``nnx.eval_shape``) too.
    """

    def one(x):
        if _is_variable(x):
            return x.replace(NamedSharding(mesh, _variable_spec(x, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_state(state, mesh, rules: Rules | None = None):
    """``jax.device_put`` an nnx state onto ``mesh`` by the rules."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def put_global(tree, shardings):
    """Place host values (identical on every process) into global arrays with ``shardings`` (a tree of
    ``NamedSharding`` matching ``tree``, e.g. from :func:`state_shardings`). Works with multi-process
    meshes, where ``jax.device_put`` cannot address the other processes' devices: each process fills
    only its own shards. For per-process data use ``jax.make_array_from_process_local_data``."""
    import numpy as np

    def one(x, s):
        arr = np.asarray(x)
        return jax.make_array_from_callback(arr.shape, s, lambda idx: arr[idx])

    return jax.tree.map(one, tree, shardings)


def shard_model(model, mesh, rules: Rules | None = None):
    """Move a (single-device) NNX model's state onto ``mesh`` in place; returns the model."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, shard_state(state, mesh, rules))
    return model


def batch_sharding(mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of token-shaped inputs ``[B, T, ...]``: batch over data/fsdp/expert, T over context."""
    names = ("activation_batch", "activation_length") + (None,) * (ndim - 2)
    return NamedSharding(mesh, logical_to_mesh_spec(names[:ndim], shape, mesh))


# ------------------------------------------------------------------------------------- activations
def current_mesh():
    """The mesh set by ``jax.set_mesh`` (abstract inside ``jit``), or None when there is none."""
    m = jax.sharding.get_abstract_mesh()
    if m is None or m.empty:
        return None
    return m


def _manual(mesh) -> bool:
    types = getattr(mesh, "axis_types", ())
    return any(t == AxisType.Manual for t in types)


def mesh_axis_size(axis: str, mesh=None) -> int:
    mesh = current_mesh() if mesh is None else mesh
    return _axis_sizes(mesh).get(axis, 1) if mesh is not None else 1


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Hint the sharding of activation ``x`` by logical names; a no-op without a mesh.

    Uses the mesh from ``jax.set_mesh``. Inside ``shard_map`` (manual axes) it does nothing. On
    Explicit-axis meshes it reshards; on Auto axes it is ``with_sharding_constraint``.
    """
    mesh = current_mesh()
    if mesh is None or _manual(mesh) or all(s == 1 for s in _axis_sizes(mesh).values()):
        return x
    spec = logical_to_mesh_spec(logical_axes, x.shape, mesh, rules)
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


__all__ = [
    "RULES", "TOKEN_AXES", "Rules", "batch_sharding", "constrain", "current_mesh", "current_rules", "put_global",
    "logical_sharding", "logical_to_mesh_spec", "mesh_axis_size", "shard_model", "shard_state",
    "state_shardings", "state_specs", "use_rules", "variable_logical_axes",
]
