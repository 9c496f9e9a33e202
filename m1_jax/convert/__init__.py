"""Checkpoint conversion between HF / PyTorch safetensors, m1-jax models and Orbax (see docs/conversion.md)."""

from m1_jax.convert.errors import CheckpointError
from m1_jax.convert.hf_export import save_hf_checkpoint
from m1_jax.convert.hf_import import load_hf_checkpoint, plan_import
from m1_jax.convert.mapping import hf_key_map
from m1_jax.convert.training_checkpoint import load_training_checkpoint

__all__ = ["CheckpointError", "hf_key_map", "load_hf_checkpoint", "load_training_checkpoint", "plan_import",
           "save_hf_checkpoint", "save_orbax", "restore_orbax", "hf_to_orbax", "orbax_to_hf"]


def __getattr__(name):
    # Orbax is imported only when asked for.
    if name in ("save_orbax", "restore_orbax", "hf_to_orbax", "orbax_to_hf"):
        from m1_jax.convert import orbax_io

        return getattr(orbax_io, name)
    raise AttributeError(f"module 'm1_jax.convert' has no attribute {name!r}")
