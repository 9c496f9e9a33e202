"""Device meshes, logical-axis rules and parallel layouts for m1-jax (see docs/sharding.md)."""
