"""Kernels for m1-jax. Imports nothing from ``m1_jax`` or ``sharding``."""

from pallas_kernels.lightning import (
    lightning_attention,
    lightning_attention_kernel,
    lightning_decode_step,
    lightning_decode_step_nodonate,
)

__all__ = ["lightning_attention", "lightning_attention_kernel", "lightning_decode_step",
           "lightning_decode_step_nodonate"]
