"""Grouped matmuls, defined by plain jnp (the oracle of the kernels) and by XLA's ragged dot.

Conventions shared by every backend of ``pallas_kernels.moe``:

* ``gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]``: rows ``[s_g, s_g + n_g)`` of
  ``lhs`` (``s_g`` = sum of the sizes before g) are multiplied by ``rhs[g]``; rows at and past
  ``sum(group_sizes)`` come out zero. ``transpose_rhs=True`` takes ``rhs [G, N, K]``.
* ``tgmm(lhs [M, K], rhs [M, N], group_sizes [G]) -> [G, K, N]``: ``lhs[rows of g]^T @ rhs[rows of
  g]`` (the weight gradient of ``gmm``); an empty group gives zeros.

Products accumulate in float32; the result has the requested dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _precision(dtype):
    # float32 operands: full precision (XLA:GPU would otherwise round them to tf32)
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def group_bounds(group_sizes):
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return ends - group_sizes.astype(jnp.int32), ends


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None):
    """One dense product per group, masked to the group's rows (G times the FLOPs: tests only)."""
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    starts, ends = group_bounds(group_sizes)
    rows = jnp.arange(lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], w.shape[2]), F32)
    for g in range(w.shape[0]):
        mine = (rows >= starts[g]) & (rows < ends[g])
        prod = jnp.dot(lhs, w[g], preferred_element_type=F32, precision=lax.Precision.HIGHEST)
        out = out + jnp.where(mine[:, None], prod, 0.0)
    return out.astype(out_dtype or lhs.dtype)


def tgmm_reference(lhs, rhs, group_sizes, *, out_dtype=None):
    starts, ends = group_bounds(group_sizes)
    rows = jnp.arange(lhs.shape[0])
    outs = []
    for g in range(group_sizes.shape[0]):
        mine = ((rows >= starts[g]) & (rows < ends[g]))[:, None]
        outs.append(jnp.dot(jnp.where(mine, lhs, 0).T, jnp.where(mine, rhs, 0), preferred_element_type=F32,
                            precision=lax.Precision.HIGHEST))
    return jnp.stack(outs).astype(out_dtype or lhs.dtype)


def gmm_xla(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None):
    """``lax.ragged_dot``: a grouped GEMM on TPU and CPU; XLA:GPU (jax 0.11) expands it into dense
    products over every group (12-25 TFLOP/s at MoE shapes on an H200)."""
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out = lax.ragged_dot(lhs, w, group_sizes.astype(jnp.int32), precision=_precision(lhs.dtype),
                         preferred_element_type=F32)
    return out.astype(out_dtype or lhs.dtype)


_TGMM_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def tgmm_xla(lhs, rhs, group_sizes, *, out_dtype=None):
    out = lax.ragged_dot_general(lhs, rhs, group_sizes.astype(jnp.int32), _TGMM_DIMS,
                                 precision=_precision(lhs.dtype), preferred_element_type=F32)
    return out.astype(out_dtype or lhs.dtype)


__all__ = ["gmm_reference", "tgmm_reference", "gmm_xla", "tgmm_xla", "group_bounds"]
