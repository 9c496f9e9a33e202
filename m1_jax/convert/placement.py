"""Where each parameter goes on a device mesh: logical axis names -> ``NamedSharding``.

The model's parameters carry logical axis names (``nnx.get_partition_spec``). ``sharding.rules`` owns
the project-wide table; until it lands this module keeps a local default with the same mesh axis names
(``data, fsdp, tensor, expert, context``). A dimension is sharded only when the mesh axis exists, has
more than one device, divides the dimension, and is not already used by another dimension of the
same parameter; otherwise that dimension is replicated.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

# logical axis name -> mesh axis (or a tuple of mesh axes), used when sharding.rules is absent
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "exp": "expert",
    "norm": None,
}


def _mesh_axes_for(logical, rules) -> tuple[str, ...]:
    if logical is None:
        return ()
    target = rules.get(logical)
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def spec_for(shape: tuple[int, ...], logical: tuple, mesh, rules=None) -> PartitionSpec:
    """The ``PartitionSpec`` of one parameter of ``shape`` with logical names ``logical`` on ``mesh``."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = tuple(a for a in _mesh_axes_for(name, rules)
                     if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if axes and dim % size == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh=None) -> dict[tuple, jax.sharding.Sharding]:
    """``{param path: sharding}`` for every leaf of an (abstract) parameter state.

    ``mesh=None``: everything on the default device.
    """
    flat = dict(nnx.to_flat_state(abstract_state))
    if mesh is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        return {p: dev for p in flat}
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(abstract_state)))
    out = {}
    for path, var in flat.items():
        shape = tuple(var.get_value().shape)
        logical = tuple(specs[path].get_value()) if path in specs else ()
        out[path] = NamedSharding(mesh, spec_for(shape, logical, mesh))
    return out
