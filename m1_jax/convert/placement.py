"""Where each parameter goes: ``{param path: Sharding}`` for an (abstract) parameter state.

With a mesh, the project's one logical-axis rules table (``sharding.rules.state_shardings``) decides;
without one, everything goes to the first device.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import SingleDeviceSharding


def param_shardings(abstract_state: nnx.State, mesh=None) -> dict[tuple, jax.sharding.Sharding]:
    flat = dict(nnx.to_flat_state(abstract_state))
    if mesh is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        return {p: dev for p in flat}
    from sharding.rules import state_shardings

    shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh)))
    return {p: shardings[p].get_value() for p in flat}
