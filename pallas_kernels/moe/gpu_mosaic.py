"""Grouped GEMMs for Hopper GPUs (wgmma, TMA) through Pallas Mosaic GPU.

Adapted from jax's ``jax/experimental/pallas/ops/gpu/ragged_dot_mgpu.py`` (``gmm``) and
``transposed_ragged_dot_mgpu.py`` (``tgmm``), Apache-2.0, the same source in jax 0.10.2 and 0.11.x.
Both kernels are persistent (one program per SM walking a snake-ordered list of output tiles) and
take groups of any size: no padding of the groups to the tile. Changes from jax's versions:

* ``gmm``: the rows at and past ``sum(group_sizes)`` form one more group that is written as zeros
  (jax leaves those rows unwritten); tiles of an empty group, of that zero group and of no group
  skip their pipeline (jax's kernel runs expert 0's products for them and stores nothing), so a
  decode step with two routed pairs reads the weights of two experts only.
* ``tgmm``: writes float32 (or the input dtype); int32 group metadata.
* the SM count from the device; ``interpret=True`` runs the kernels in the Mosaic GPU interpreter
  on the CPU. Its wgmma takes no transposed operands, so there the products are plain dots on the
  SMEM values; the group and tile logic (the part these kernels add) is the same code.

Requirements: ``lhs`` and ``rhs`` of one 16-bit dtype (float32 runs only in the interpreter: wgmma
would round it to tf32), ``K % block_k == 0`` and ``N % block_n == 0`` for ``gmm``, ``K % block_m``
and ``N % block_n`` for ``tgmm``. ``pallas_kernels.moe.op`` checks these and pads rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

I32 = jnp.int32
F32 = jnp.float32
SMEM_BYTES = 227 * 1024  # Hopper: shared memory one block may use


def _interpret_params():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # a JAX without the Mosaic GPU interpreter
        return None
    return InterpretGPUParams()


def interpret_supported() -> bool:
    return _interpret_params() is not None


def _num_sms(interpret: bool) -> int:
    if interpret:
        return 4
    return int(getattr(jax.devices()[0], "core_count", None) or 132)


def _compiler_params():
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _acc_type(block_m, block_n, interp):
    # compiled: a zero-initialised WGMMA accumulator in registers; the interpreter has no
    # accumulator loads/stores, so there it is a float32 SMEM buffer zeroed by the kernel
    return plgpu.SMEM((block_m, block_n), F32) if interp else plgpu.ACC((block_m, block_n))


def _tile_order(idx, grid_m, grid_n, grid_block_n, interp):
    """(M tile, N tile) of a linear index: jax's snake order on the GPU. The interpreter takes plain
    row-major order: XLA:CPU constant-folds the snake's modulo by a zero width on small grids and
    dies of SIGFPE while compiling."""
    if interp:
        return lax.div(idx, jnp.int32(grid_n)), lax.rem(idx, jnp.int32(grid_n))
    return plgpu.planar_snake(idx, (grid_m, grid_n), 1, grid_block_n)


def gmm_smem_bytes(block_m, block_n, block_k, steps, itemsize=2) -> int:
    return (block_m * block_k + block_k * block_n) * steps * itemsize + block_m * block_n * itemsize


def tgmm_smem_bytes(block_m, block_n, block_k, steps, itemsize=2, out_itemsize=4) -> int:
    return (block_k * block_m + block_k * block_n) * steps * itemsize + block_m * block_n * out_itemsize


class _Tile:
    """Which group an M tile ``tid`` of the flattened (tile, group) list belongs to (jax's GroupInfo).

    The list visits the M tiles of each group in turn; a tile that two groups share is visited
    once per group. ``actual_start/size``: the rows of this visit."""

    def __init__(self, sizes_ref, num_groups, tile, tid):
        tile = jnp.int32(tile)
        group_end = group_start = block = group = end = jnp.array(0, dtype=I32)
        # few groups: unrolled, with selects instead of an early exit
        for i in range(num_groups):
            start = end
            end = start + sizes_ref[i]
            start_block = lax.div(start, tile)
            block_end = lax.div(end - 1, tile) + 1
            tid_begin, tid_end = start_block + i, block_end + i
            here = (tid_begin <= tid) & (tid < tid_end)
            block = lax.select(here, tid - tid_begin + start_block, block)
            group = lax.select(here, jnp.int32(i), group)
            group_start = lax.select(here, start, group_start)
            group_end = lax.select(here, end, group_end)
        self.group_id = group
        self.block = block
        self.block_start = block * tile
        self.actual_start = jnp.maximum(group_start, self.block_start)
        actual_end = jnp.minimum(group_end, self.block_start + tile)
        self.start_within_block = self.actual_start - self.block_start
        self.actual_size = actual_end - self.actual_start


def _persistent_kernel(body, out_type, interp):
    """``body`` as a jitted kernel of one program per SM (the persistent tile loop of gmm and tgmm)."""
    kw = {"interpret": _interpret_params()} if interp else {}
    return jax.jit(plgpu.kernel(body, out_type=out_type, grid=(_num_sms(interp),), grid_names=("sm",),
                                compiler_params=_compiler_params(), **kw))


@functools.lru_cache(maxsize=None)
def _gmm_kernel(m, k, n, g, dtype, transpose_rhs, block_m, block_n, block_k, max_concurrent_steps, grid_block_n,
                interp):
    """The jitted gmm kernel of one configuration. The MoE layers of a model with the same shapes call the
    same function object, so JAX lowers the kernel once per program, not once per layer."""
    grid_m = pl.cdiv(m, block_m) + g  # g + 1 groups: at most g tiles visited twice
    grid_n = pl.cdiv(n, block_n)

    def body(sizes_ref, lhs_gmem, rhs_gmem, o_gmem):
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def mn_loop(loop_info):
            mi, ni = _tile_order(loop_info.index[0], grid_m, grid_n, grid_block_n, interp)
            t = _Tile(sizes_ref, g + 1, block_m, mi)
            compute = (t.actual_size > 0) & (t.group_id < g)
            gid = jnp.minimum(t.group_id, g - 1)

            def step(_, lhs_smem, rhs_smem, acc_ref):
                if interp:
                    dims = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
                    acc_ref[...] += lax.dot_general(lhs_smem[...], rhs_smem[...], (dims, ((), ())),
                                                    preferred_element_type=F32)
                else:
                    plgpu.wgmma(acc_ref, lhs_smem,
                                plgpu.transpose_ref(rhs_smem, (1, 0)) if transpose_rhs else rhs_smem)

            def acc_scope(acc_ref):
                if interp:
                    acc_ref[...] = jnp.zeros((block_m, block_n), F32)

                @pl.when(compute)
                def _():
                    plgpu.emit_pipeline(
                        lambda i, a, b: step(i, a, b, acc_ref),
                        grid=(k // block_k,),
                        in_specs=[
                            plgpu.BlockSpec((block_m, block_k), lambda kk: (t.block, kk), delay_release=1),
                            plgpu.BlockSpec((block_n, block_k) if transpose_rhs else (block_k, block_n),
                                            (lambda kk: (ni, kk)) if transpose_rhs else (lambda kk: (kk, ni)),
                                            delay_release=1),
                        ],
                        max_concurrent_steps=max_concurrent_steps,
                    )(lhs_gmem, rhs_gmem.at[gid])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, _acc_type(block_m, block_n, interp))

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), dtype=o_gmem.dtype))
            def store_scope(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                # TMA stores need static row counts: a ladder of power-of-two stores covers any
                # number of rows in 1..min(block_m, m) (see jax's ragged_dot_mgpu.py).
                smem_start = t.start_within_block
                remaining = min(block_m, m)
                while remaining > 0:
                    rows = 1 << int(math.log2(remaining))
                    remaining //= 2

                    @pl.when(t.actual_size & rows != 0)
                    def _():
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[pl.ds(smem_start, rows)],
                            o_gmem.at[pl.ds(t.block_start + smem_start, rows), pl.ds(ni * block_n, block_n)])

                    smem_start += t.actual_size & rows
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _persistent_kernel(body, jax.ShapeDtypeStruct((m, n), dtype), interp)


def _interpret_flag(name: str, interpret) -> bool:
    if interpret and not interpret_supported():
        raise ValueError(f"{name}: this JAX has no Mosaic GPU interpreter")
    return bool(interpret)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, block_m=128, block_n=128, block_k=64,
        max_concurrent_steps=4, grid_block_n=1, interpret=False):
    """``lhs [M, K] @ rhs[g] [K, N]`` per group (``rhs [G, N, K]`` with ``transpose_rhs``); out in
    lhs's dtype, rows past ``sum(group_sizes)`` zero."""
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"gmm: lhs and rhs must have one dtype, got {lhs.dtype} and {rhs.dtype}")
    m, k = lhs.shape
    g = rhs.shape[0]
    n, k2 = (rhs.shape[1], rhs.shape[2]) if transpose_rhs else (rhs.shape[2], rhs.shape[1])
    if k != k2:
        raise ValueError(f"gmm: contraction sizes differ: lhs {lhs.shape}, rhs {rhs.shape} "
                         f"(transpose_rhs={transpose_rhs})")
    if group_sizes.shape != (g,):
        raise ValueError(f"gmm: group_sizes has shape {group_sizes.shape}, expected ({g},)")
    if k % block_k or n % block_n:
        raise ValueError(f"gmm: K={k} must be a multiple of block_k={block_k} and N={n} of block_n={block_n}")
    interp = _interpret_flag("gmm", interpret)
    gs = group_sizes.astype(I32)
    sizes = jnp.concatenate([gs, jnp.reshape(m - jnp.sum(gs), (1,))])  # + the zero group
    kernel = _gmm_kernel(m, k, n, g, jnp.dtype(lhs.dtype), bool(transpose_rhs), block_m, block_n, block_k,
                         max_concurrent_steps, grid_block_n, interp)
    return kernel(sizes, lhs, rhs)


def _smem_transforms(minor: int, dtype):
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


@functools.lru_cache(maxsize=None)
def _tgmm_kernel(rows, m, n, g, lhs_dtype, rhs_dtype, out_dtype, block_m, block_n, block_k, max_concurrent_steps,
                 grid_block_n, interp):
    """The jitted tgmm kernel of one configuration (lowered once per program, as ``_gmm_kernel``)."""
    in_lhs = _smem_transforms(block_m, lhs_dtype)
    in_rhs = _smem_transforms(block_n, rhs_dtype)
    out_tf = _smem_transforms(block_n, out_dtype)
    grid_m = pl.cdiv(m, block_m)
    grid_n = pl.cdiv(n, block_n)

    def body(sizes_gmem, starts_gmem, ends_gmem, nblocks_gmem, bstarts_gmem, lhs_gmem, rhs_gmem, o_gmem):
        @plgpu.nd_loop((g, grid_m * grid_n), collective_axes="sm")
        def mn_loop(loop_info):
            gi = loop_info.index[0]
            mi, ni = _tile_order(loop_info.index[1], grid_m, grid_n, grid_block_n, interp)
            # potentially out of bounds past the group's blocks, which the pipeline never visits
            block_start = pl.multiple_of(bstarts_gmem[gi], block_k)
            window = pl.ds(block_start, rows)

            def acc_scope(acc_ref):
                if interp:
                    acc_ref[...] = jnp.zeros((block_m, block_n), F32)

                def mask_rows(lhs_smem, keep):
                    x = lhs_smem[...]
                    r = lax.broadcasted_iota(I32, (block_k, block_m), 0)
                    if not interp:
                        r = plgpu.layout_cast(r, plgpu.Layout.WGMMA)
                    lhs_smem[...] = x * keep(r).astype(x.dtype)
                    plgpu.commit_smem()

                def block_matmul(idx, lhs_smem, rhs_smem):
                    b = idx[0]

                    @pl.when(b == 0)  # the first block may start with the previous group's rows
                    def _():
                        first = lax.rem(starts_gmem[gi], block_k)
                        mask_rows(lhs_smem, lambda r: r >= first)

                    @pl.when(b == nblocks_gmem[gi] - 1)  # the last may end with the next group's
                    def _():
                        last = lax.rem(ends_gmem[gi] - 1, block_k)
                        mask_rows(lhs_smem, lambda r: r <= last)

                    if interp:
                        acc_ref[...] += lax.dot_general(lhs_smem[...], rhs_smem[...], (((0,), (0,)), ((), ())),
                                                        preferred_element_type=F32)
                    else:
                        plgpu.wgmma(acc_ref, plgpu.transpose_ref(lhs_smem, (1, 0)), rhs_smem)
                        if max_concurrent_steps == 1:  # no second SMEM slot: wait before it is reused
                            plgpu.wgmma_wait(0)

                @pl.when(sizes_gmem[gi] > 0)  # empty group: zeros
                def _():
                    release = 1 if max_concurrent_steps > 1 else 0
                    plgpu.emit_pipeline(
                        block_matmul,
                        grid=(nblocks_gmem[gi],),
                        in_specs=[
                            plgpu.BlockSpec((block_k, block_m), lambda kk: (kk, mi), delay_release=release,
                                            transforms=in_lhs),
                            plgpu.BlockSpec((block_k, block_n), lambda kk: (kk, ni), delay_release=release,
                                            transforms=in_rhs),
                        ],
                        max_concurrent_steps=max_concurrent_steps,
                    )(lhs_gmem.at[window, :], rhs_gmem.at[window, :])

                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, _acc_type(block_m, block_n, interp))

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), dtype=out_dtype,
                                                                 transforms=out_tf))
            def store_scope(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[gi, pl.ds(mi * block_m, block_m),
                                                          pl.ds(ni * block_n, block_n)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _persistent_kernel(body, jax.ShapeDtypeStruct((g, m, n), out_dtype), interp)


def tgmm(lhs, rhs, group_sizes, *, out_dtype=F32, block_m=128, block_n=128, block_k=64,
         max_concurrent_steps=4, grid_block_n=1, interpret=False):
    """``lhs[rows of g]^T @ rhs[rows of g]`` per group: ``lhs [M, K]``, ``rhs [M, N]`` -> ``[G, K, N]``."""
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"tgmm: lhs and rhs must have one dtype, got {lhs.dtype} and {rhs.dtype}")
    rows, m = lhs.shape  # jax's names: the ragged (contracted) dim is "k", the output is [g, m, n]
    rows2, n = rhs.shape
    if rows != rows2:
        raise ValueError(f"tgmm: lhs {lhs.shape} and rhs {rhs.shape} need the same number of rows")
    if m % block_m or n % block_n:
        raise ValueError(f"tgmm: K={m} must be a multiple of block_m={block_m} and N={n} of block_n={block_n}")
    interp = _interpret_flag("tgmm", interpret)
    g = group_sizes.shape[0]
    gs = group_sizes.astype(I32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    block_starts = starts // block_k * block_k
    num_blocks = (-(ends // -block_k) * block_k - block_starts) // block_k
    kernel = _tgmm_kernel(rows, m, n, g, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype), jnp.dtype(out_dtype), block_m,
                          block_n, block_k, max_concurrent_steps, grid_block_n, interp)
    return kernel(gs, starts.astype(I32), ends.astype(I32), num_blocks.astype(I32), block_starts.astype(I32),
                  lhs, rhs)


__all__ = ["gmm", "tgmm", "interpret_supported", "gmm_smem_bytes", "tgmm_smem_bytes", "SMEM_BYTES"]
