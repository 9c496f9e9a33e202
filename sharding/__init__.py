"""Device meshes, logical-axis rules and parallel layouts for m1-jax (see docs/sharding.md).

Dependency direction: ``pallas_kernels`` <- ``sharding`` <- ``m1_jax``.
"""

from sharding.mesh import AXES, MeshConfig, initialize_distributed, make_mesh, mesh_sizes
from sharding.rules import (RULES, batch_sharding, constrain, current_mesh, logical_sharding, logical_to_mesh_spec, put_global,
                            shard_model, shard_state, state_shardings, state_specs, use_rules)

__all__ = [
    "AXES", "MeshConfig", "RULES", "batch_sharding", "constrain", "current_mesh", "initialize_distributed",
    "logical_sharding", "logical_to_mesh_spec", "make_mesh", "mesh_sizes", "put_global", "shard_model", "shard_state",
    "state_shardings", "state_specs", "use_rules",
]
