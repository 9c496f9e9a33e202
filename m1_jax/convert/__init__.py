"""Checkpoint conversion between HF / PyTorch safetensors and m1-jax."""

from m1_jax.convert.hf_import import CheckpointError, load_hf_checkpoint
from m1_jax.convert.mapping import hf_key_map

__all__ = ["CheckpointError", "hf_key_map", "load_hf_checkpoint"]
