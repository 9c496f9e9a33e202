"""Kernels for m1-jax. Imports nothing from ``m1_jax`` or ``sharding``."""

from pallas_kernels.lightning import lightning_attention

__all__ = ["lightning_attention"]
