"""Grouped GEMMs through Pallas's Triton lowering (any CUDA GPU; the fallback of the Mosaic kernels).

``gmm``: one program per (visited M tile, N tile). The M tiles each group touches are listed in
XLA before the kernel (a tile two groups share is visited once per group; at most
``cdiv(M, bm) + G`` visits), and each visit stores only its group's rows. The rows past
``sum(group_sizes)`` are one more group, stored as zeros; visits past the list do nothing.

``tgmm``: one program per (group, K tile, N tile) walks the group's rows in blocks of ``bk`` with
masked loads (rows of other groups read as zero).

Both need ``M`` to be a multiple of the row tiles (the op pads), ``K``, ``N`` multiples of the
feature tiles; tiles are powers of two (Triton). Products accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

I32 = jnp.int32
F32 = jnp.float32


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, ca: int, cb: int, prec):
    """float32-accumulated product contracting dim ``ca`` of ``a`` with ``cb`` of ``b`` (``pl.dot`` is gone
    from jax 0.12 and deprecated in 0.11: the Triton lowering takes dot_general with transposes)."""
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=prec, preferred_element_type=F32)


def tile_visits(group_sizes, m: int, bm: int):
    """``(tile_group [T], tile_block [T], starts [G + 2], ends [G + 2])`` for ``gmm``: visit t works
    on rows ``[tile_block[t] * bm, + bm)`` of group ``tile_group[t]``; group G holds the rows past the
    sum of the sizes, index G + 1 (empty) marks visits past the list."""
    G = group_sizes.shape[0]
    gs = group_sizes.astype(I32)
    sizes = jnp.concatenate([gs, jnp.reshape(m - jnp.sum(gs), (1,))])
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // bm
    count = jnp.where(sizes > 0, (ends - 1) // bm - first + 1, 0)
    offs = jnp.cumsum(count)
    T = pl.cdiv(m, bm) + G
    t = jnp.arange(T, dtype=I32)
    tg = jnp.searchsorted(offs, t, side="right").astype(I32)  # G + 1 past the list
    gc = jnp.minimum(tg, G)
    tb = jnp.where(tg <= G, first[gc] + t - (offs[gc] - count[gc]), 0)
    pad = jnp.zeros((1,), I32)
    return tg, tb.astype(I32), jnp.concatenate([starts, pad]), jnp.concatenate([ends, pad])


def _gmm_kernel(tg_ref, tb_ref, st_ref, en_ref, x_ref, w_ref, o_ref, *, G, K, bm, bn, bk, transpose, prec):
    t, j = pl.program_id(0), pl.program_id(1)
    g = tg_ref[t]
    r0 = pl.multiple_of(tb_ref[t] * bm, bm)
    rows = r0 + lax.broadcasted_iota(I32, (bm,), 0)
    mine = (rows >= st_ref[g]) & (rows < en_ref[g])
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
    gw = jnp.minimum(g, G - 1)

    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
        a = x_ref[pl.ds(r0, bm), ks]
        b = w_ref[gw, cols, ks] if transpose else w_ref[gw, ks, cols]
        return acc + _dot(a, b, 1, 1 if transpose else 0, prec)

    zero = jnp.zeros((bm, bn), F32)
    acc = lax.cond(g < G, lambda: lax.fori_loop(0, K // bk, body, zero), lambda: zero)
    pltriton.store(o_ref.at[pl.ds(r0, bm), cols], acc.astype(o_ref.dtype), mask=mine[:, None])


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, block_m=64, block_n=128, block_k=64, num_warps=4,
        num_stages=3, interpret=False):
    m, k = lhs.shape
    G = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m % block_m or k % block_k or n % block_n:
        raise ValueError(f"triton gmm: M={m}, K={k}, N={n} must be multiples of the tiles "
                         f"({block_m}, {block_k}, {block_n})")
    tg, tb, st, en = tile_visits(group_sizes, m, block_m)
    kern = functools.partial(_gmm_kernel, G=G, K=k, bm=block_m, bn=block_n, bk=block_k, transpose=transpose_rhs,
                             prec=_precision(lhs.dtype))
    full = lambda shape: pl.BlockSpec(shape, lambda t, j: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        kern, out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype), grid=(tg.shape[0], n // block_n),
        in_specs=[full(tg.shape), full(tb.shape), full(st.shape), full(en.shape), full(lhs.shape), full(rhs.shape)],
        out_specs=full((m, n)), compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="moe_gmm")(tg, tb, st, en, lhs, rhs.astype(lhs.dtype))


def _tgmm_kernel(st_ref, en_ref, x_ref, dy_ref, o_ref, *, bm, bn, bk, prec):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = st_ref[g], en_ref[g]
    xcols = pl.ds(pl.multiple_of(i * bm, bm), bm)
    ycols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    def body(b, acc):
        r0 = pl.multiple_of(b * bk, bk)
        rows = r0 + lax.broadcasted_iota(I32, (bk,), 0)
        mine = ((rows >= start) & (rows < end))[:, None]
        a = pltriton.load(x_ref.at[pl.ds(r0, bk), xcols], mask=mine, other=0.0)
        d = pltriton.load(dy_ref.at[pl.ds(r0, bk), ycols], mask=mine, other=0.0)
        return acc + _dot(a, d, 0, 0, prec)

    acc = lax.fori_loop(start // bk, (end + bk - 1) // bk, body, jnp.zeros((bm, bn), F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def tgmm(lhs, rhs, group_sizes, *, out_dtype=F32, block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3,
         interpret=False):
    rows, k = lhs.shape
    n = rhs.shape[1]
    if rows % block_k or k % block_m or n % block_n:
        raise ValueError(f"triton tgmm: rows={rows}, K={k}, N={n} must be multiples of the tiles "
                         f"({block_k}, {block_m}, {block_n})")
    G = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes.astype(I32))
    starts = ends - group_sizes.astype(I32)
    kern = functools.partial(_tgmm_kernel, bm=block_m, bn=block_n, bk=block_k, prec=_precision(lhs.dtype))
    full = lambda shape: pl.BlockSpec(shape, lambda g, i, j: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        kern, out_shape=jax.ShapeDtypeStruct((G, k, n), out_dtype), grid=(G, k // block_m, n // block_n),
        in_specs=[full((G,)), full((G,)), full(lhs.shape), full(rhs.shape)],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda g, i, j: (g, i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="moe_tgmm")(starts, ends, lhs, rhs)


__all__ = ["gmm", "tgmm", "tile_visits"]
