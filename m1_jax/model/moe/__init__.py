"""Mixture of Experts: float32 softmax router, top-k with renormalised weights, SwiGLU experts.

``router`` (routing, load-balancing loss), ``permute`` (sorting pairs by expert, gathers with
gather gradients, capacity slots), ``experts`` (the one expert computation: grouped GEMMs),
``layer`` (the ``MoE`` module and every ``moe_impl``).
"""

from m1_jax.model.moe.experts import expert_ffn
from m1_jax.model.moe.layer import MoE, is_decode_shape, moe_forward, resolve_impl
from m1_jax.model.moe.router import RouterStats, load_balancing_loss, route

__all__ = ["MoE", "RouterStats", "expert_ffn", "is_decode_shape", "load_balancing_loss", "moe_forward",
           "resolve_impl", "route"]
