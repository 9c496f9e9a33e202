"""Grouped GEMMs on TPU: jax's megablox kernels (``jax.experimental.pallas.ops.tpu.megablox``).

megablox's ``gmm`` takes ``lhs [M, K]``, ``rhs [G, K, N]`` (or ``[G, N, K]`` with ``transpose_rhs``)
and may leave the rows past ``sum(group_sizes)`` unwritten (the wrapper zeroes them); its ``tgmm`` takes the transposed left operand
``[K, M]``. Both need ``M`` to be a multiple of the row tile (the op pads). ``interpret=True``
runs them on the CPU (tests).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as _megablox_gmm
from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as _megablox_tgmm


def _tile(dim: int, pref: int) -> int:
    """The preferred tile when it divides ``dim``, else ``dim`` itself (one tile)."""
    return pref if dim % pref == 0 else dim


def row_tile(m: int) -> int:
    return 128 if m >= 128 else max(8, -(-m // 8) * 8)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, tiling=None, interpret=False):
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiling = tiling or (row_tile(m), _tile(k, 512), _tile(n, 512))
    out = _megablox_gmm(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), lhs.dtype, tuple(tiling),
                        transpose_rhs=transpose_rhs, interpret=interpret)
    # megablox leaves the rows past the groups unwritten in some layouts (NaN in the interpreter)
    rows = jnp.arange(m)[:, None]
    return jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))


def tgmm(lhs, rhs, group_sizes, *, out_dtype=jnp.float32, tiling=None, interpret=False):
    m, k = lhs.shape
    n = rhs.shape[1]
    tiling = tiling or (row_tile(m), _tile(k, 512), _tile(n, 512))
    return _megablox_tgmm(lhs.T, rhs, group_sizes.astype(jnp.int32), out_dtype, tuple(tiling),
                         num_actual_groups=group_sizes.shape[0], interpret=interpret)


__all__ = ["gmm", "tgmm", "row_tile"]
