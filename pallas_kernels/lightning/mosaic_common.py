"""What the Mosaic GPU lightning kernels share: compiler and interpreter parameters, SMEM layouts, register
helpers that also run in the interpreter, and the per-chunk decays (``common.py`` has the math).

The interpreter has no register layouts and its wgmma has no transposed operands: there ``Regs`` makes
plain iotas, loads and dots.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32


def interpret_params():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # older JAX: no Mosaic GPU interpreter
        return None
    return InterpretGPUParams()


def interpret_supported() -> bool:
    return interpret_params() is not None


def compiler_params():
    # Lane semantics (per-thread register arrays) is the mode whose lowering broadcasts scalars.
    sem = getattr(getattr(plgpu, "LoweringSemantics", None), "Lane", None)
    try:
        return plgpu.CompilerParams(approx_math=False, lowering_semantics=sem) if sem is not None else \
            plgpu.CompilerParams(approx_math=False)
    except TypeError:  # a JAX without the field
        return plgpu.CompilerParams(approx_math=False)


def transforms(dtype):
    """SMEM layout for TMA and wgmma: 128-byte swizzled rows of 8-row tiles."""
    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def smem(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=transforms(dtype))


class Regs:
    """Register arrays in the WGMMA layout (compiled) or plain arrays (interpreter)."""

    def __init__(self, interp: bool):
        self.interp = interp
        self.wg = plgpu.Layout.WGMMA
        self.row = self.wg.reduce(1)

    def iota(self, shape, dim, layout=None):
        if self.interp:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        layout = layout or (self.wg if len(shape) == 2 else self.row)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)

    def load(self, ref):
        return ref[...] if self.interp else plgpu.load(ref, (), layout=self.wg)

    def load_rows(self, ref):
        return ref[...] if self.interp else plgpu.load(ref, (), layout=self.row)

    def zeros(self, shape):
        z = jnp.zeros(shape, F32)
        return z if self.interp else plgpu.layout_cast(z, self.wg if len(shape) == 2 else self.row)

    @staticmethod
    def dot(u, w, dims):
        return lax.dot_general(u, w, (dims, ((), ())), preferred_element_type=F32)


def decay_mask(regs: Regs, lam, C, reverse):
    """The intra-chunk decay mask D [C, C] (forward walks) or D^T (reverse walks), and the column index."""
    r2, c2 = regs.iota((C, C), 0), regs.iota((C, C), 1)
    dist = (c2 - r2) if reverse else (r2 - c2)
    M = jnp.where(dist >= 0, jnp.exp(-lam * jnp.maximum(dist, 0).astype(F32)), regs.zeros((C, C)))
    return M, c2


def chunk_decays_of_docs(regs: Regs, lam, rows, m, C, first_smem, last_smem):
    """``chunk_decays`` of a chunk of packed documents, and the chunk's row bounds (first, last)."""
    first, last = regs.load_rows(first_smem), regs.load_rows(last_smem)
    return chunk_decays(regs, lam, rows, m, C, docs=(first, last, first_smem)) + (first, last)


def chunk_decays(regs: Regs, lam, rows, m, C, docs=None):
    """Row vectors a, b [C] and the chunk decay g of a chunk with m real rows (padded rows are zero in every
    input, so b's exponent is clamped there instead of masked). ``docs``: (first, last, first_smem) of packed
    documents (``gpu_mosaic.doc_bounds``): a keeps only rows that continue the entering state's document, b
    only the rows of the document that leaves the chunk, and no state crosses a document start."""
    a = jnp.exp(-lam * (rows + 1.0))
    b = jnp.exp(-lam * jnp.maximum(m - 1.0 - rows, 0.0))
    g = jnp.exp(-lam * m)
    if docs is not None:
        first, last, first_smem = docs
        a = jnp.where(first < 0, a, regs.zeros((C,)))
        b = jnp.where(last == C - 1, b, regs.zeros((C,)))
        g = g * (first_smem[C - 1] < 0).astype(F32)
    return a, b, g


def doc_mask(regs: Regs, M, c2, first, last, C, reverse):
    """P only within a document: columns from the row's document start (forward) or to its end (reverse)."""
    bound = lax.broadcast_in_dim(last if reverse else jnp.maximum(first, 0), (C, C), [0])
    same = (c2 <= bound) if reverse else (c2 >= bound)
    return jnp.where(same, M, regs.zeros((C, C)))


def bcast(row, C, width):
    return lax.broadcast_in_dim(row, (C, width), [0])


def chunk_products(regs: Regs, x_smem, y_smem, s16, zr, S, g, C, width):
    """The three products of a walk's chunk that do not need P, issued together with one wait (compiled):
    ``X Y^T [C, C]``, ``X bf16(S) [C, width]`` and the state update ``g S + Y^T (r_st Z)``."""
    def issue(accs):
        s_acc, xs_acc, st_acc = accs
        plgpu.wgmma(s_acc, x_smem, plgpu.transpose_ref(y_smem, (1, 0)))
        plgpu.wgmma(xs_acc, x_smem, s16)
        plgpu.wgmma(st_acc, plgpu.transpose_ref(y_smem, (1, 0)), zr)
    return pl.run_state(issue)(
        (plgpu.ACC.init(regs.zeros((C, C))), plgpu.ACC.init(regs.zeros((C, width))), plgpu.ACC.init(S * g)))


def state_product(y_smem, zr, S, g):
    """A state-only walk's chunk (compiled): ``g S + Y^T (r_st Z)``."""
    return pl.run_state(lambda acc: plgpu.wgmma(acc, plgpu.transpose_ref(y_smem, (1, 0)), zr))(plgpu.ACC.init(S * g))


def run_warp_specialized(step, compute, specs, srcs, *, L, steps, C, chunk, doc_rows=None, compute_wgs=2):
    """Streams a walk's L chunks (``chunk(i)``: the chunk of step i) through a memory warpgroup to
    ``compute_wgs`` compute warpgroups. ``doc_rows``: the (first, last) row refs of packed documents
    (``gpu_mosaic.doc_bounds``), which ride in the stages ahead of the chunks."""
    if doc_rows is not None:
        rows_spec = plgpu.BlockSpec(block_shape=(C,), index_map=lambda n: (chunk(n),))
        specs = [rows_spec, rows_spec] + list(specs)
        srcs = list(doc_rows) + list(srcs)
    pipe = plgpu.emit_pipeline_warp_specialized(
        step, grid=(L,), memory_registers=40, in_specs=specs, max_concurrent_steps=steps, wg_axis="wg",
        num_compute_wgs=compute_wgs, compute_context=compute)
    pipe(*srcs)


def walk_args(x, y, z, lam, s0, docs, *, with_out, lam_pad):
    """A walk kernel's operands in its order: document bounds, X (with outputs), Y, Z, entering states (when
    given), and the rates as [H, lam_pad] float32 rows (a TMA copy moves a multiple of 128 bytes)."""
    args = (x, y, z) if with_out else (y, z)
    if docs is not None:
        args = (docs.first, docs.last) + args
    if s0 is not None:
        args = args + (s0.astype(F32),)
    return args + (jnp.broadcast_to(lam.astype(F32)[:, None], (lam.shape[0], lam_pad)),)
