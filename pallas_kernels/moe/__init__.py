"""Grouped GEMMs for the dropless MoE: the differentiable op, its kernels and their references.

``grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G])`` is the model's entry point for the
expert products (``op.py``: backends by platform, custom VJP). Kernels: ``gpu_mosaic`` (Hopper), ``gpu_triton``
(CUDA GPUs), ``tpu`` (megablox); ``reference`` holds the plain-jnp oracle and ``lax.ragged_dot``.
``moe_decode`` (``decode_triton``) runs a decode step's few (token, expert) pairs through SwiGLU experts
in two Triton-lowered kernels.
"""

from pallas_kernels.moe.decode_triton import moe_decode
from pallas_kernels.moe.op import BACKENDS, HOPPER_AUTO, gmm, grouped_matmul, resolve_backend, tgmm
from pallas_kernels.moe.reference import gmm_reference, tgmm_reference

__all__ = ["BACKENDS", "HOPPER_AUTO", "grouped_matmul", "gmm", "tgmm", "resolve_backend", "gmm_reference",
           "tgmm_reference", "moe_decode"]
