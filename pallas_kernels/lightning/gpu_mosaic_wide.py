"""The wide walk of the Mosaic GPU lightning kernels: one program per (batch, head, segment) walks both 64-column
pieces of a 128-wide state, where ``gpu_mosaic._walk`` runs one program per piece.

``_walk`` keeps one warpgroup per program and, at its SMEM footprint, one program per SM: that warpgroup issues
the copies, waits on its products and computes the decays in turn, and the programs of the two pieces each
read the whole X and Y chunks. Here a memory warpgroup streams the chunks (``emit_pipeline_warp_specialized``)
and two compute warpgroups share them, each holding one piece ``S_w = S[:, piece w]`` (float32, registers).
Per chunk (``gpu_mosaic``'s module docstring has the formulas: r_out, r_st, g, M) each warpgroup computes

    P   = (X Y^T) * M                       (both warpgroups: a [C, C] product is cheap next to a stall)
    out_w = r_out * (X S_w) + P Z_w
    S_w'  = g S_w + Y^T (r_st * Z_w)

with no exchange between them: they meet only at the start (the float32 staging buffer of the entering
state is aliased with their operand and output buffers) and at the end. X and Y are read once per (b, h)
instead of once per piece.

The same walk serves every ``_walk`` use with Z 128 wide: the forward (X, Y, Z = Q, K, V), the backward's dq
walk (dO, V, K), the state-only walks of segments (``with_out=False``: Y and Z only) forwards and in reverse,
and packed documents. Requirements: Z 128 wide, X and Y 128 wide when compiled (64 runs in the interpreter
but has not been compiled on a GPU), the rest as ``gpu_mosaic`` (bf16/f16, C = 64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.lightning import mosaic_common as mc
from pallas_kernels.lightning.segments import LAM_PAD

F32 = jnp.float32
PIECE = 64  # state columns per compute warpgroup
COMPUTE_WGS = 2
SMEM_LIMIT = 227 * 1024


def supported(Dy, Dz, interpret=False) -> bool:
    """Z 128 wide (two pieces) and Y 128 wide compiled; Y 64 wide runs in the interpreter only."""
    return Dz == PIECE * COMPUTE_WGS and Dy in ((64, 128) if interpret else (128,))


def smem_bytes(Dy, steps, *, with_out=True, docs=False, C=64, itemsize=2):
    """Shared memory of one program: the pipeline's stages (X, Y, Z chunks; rows of packed documents), per
    warpgroup bf16(S_w), r_st * Z_w and two output slots (aliased with the float32 staging buffer of the
    states), and ~2 KiB of rates and barriers."""
    Dz = PIECE * COMPUTE_WGS
    stage = C * ((Dy if with_out else 0) + Dy + Dz) * itemsize + (2 * C * 4 if docs else 0)
    per_wg = C * PIECE * itemsize + ((Dy * PIECE + 2 * C * PIECE) * itemsize if with_out else 0)
    shared = max(COMPUTE_WGS * per_wg, COMPUTE_WGS * Dy * PIECE * 4)
    return steps * stage + shared + 2048


def pipeline_steps(Dy, requested, *, with_out=True, docs=False):
    """The most pipeline stages, up to ``requested``, whose shared memory fits."""
    steps = max(1, int(requested))
    while steps > 1 and smem_bytes(Dy, steps, with_out=with_out, docs=docs) > SMEM_LIMIT:
        steps -= 1
    return steps


def _kernel(*refs, T, C, L, seg0, Dy, dtype, steps, reverse, with_out, docs, from_zero, interp, union):
    refs = list(refs)
    first_ref, last_ref = (refs.pop(0), refs.pop(0)) if docs else (None, None)
    x_ref = refs.pop(0) if with_out else None
    y_ref, z_ref, *refs = refs
    s0_ref = None if from_zero else refs.pop(0)
    lam_ref, *refs = refs
    out_ref = refs.pop(0) if with_out else None
    st_ref, bufs, lam_smem, bars, sync_bar = refs
    s16 = out_smem = None
    if not with_out:
        zr_smem, stage = bufs
    elif union:
        (s16, zr_smem, out_smem), (stage,) = bufs
    else:  # the interpreter: the same buffers without aliasing
        s16, zr_smem, out_smem, stage = bufs
    bi, hi, si = (lax.axis_index(a) for a in ("b", "h", "s"))
    wg = lax.axis_index("wg")
    regs = mc.Regs(interp)
    seg = si + seg0  # the walk's segments are the sequence's segments seg0, seg0 + 1, ...
    chunk = (lambda i: seg * L + L - 1 - i) if reverse else (lambda i: seg * L + i)
    piece = lambda w: pl.ds(w * PIECE, PIECE)  # noqa: E731

    def sync():
        plgpu.barrier_arrive(sync_bar)
        plgpu.barrier_wait(sync_bar)

    def step(idx, *bufs):
        bufs = list(bufs)
        first_smem, last_smem = (bufs.pop(0), bufs.pop(0)) if docs else (None, None)
        x_smem = bufs.pop(0) if with_out else None
        y_smem, z0, z1, carry = bufs
        S, M = carry if with_out else (carry, None)
        z_pieces = (z0, z1)
        n = chunk(idx[0])
        m = jnp.clip(T - n * C, 0, C).astype(F32)  # real rows of this chunk (identity steps past T)
        rows = regs.iota((C,), 0).astype(F32)

        def role(w):
            """Warpgroup w's step, traced with w static."""
            lam_w = lam_smem[w, 0]
            M_chunk = M
            if docs:
                a, b, g, first, last = mc.chunk_decays_of_docs(regs, lam_w, rows, m, C, first_smem, last_smem)
                if with_out:
                    M_chunk = mc.doc_mask(regs, M, regs.iota((C, C), 1), first, last, C, reverse)
            else:
                a, b, g = mc.chunk_decays(regs, lam_w, rows, m, C)
            r_out, r_st = (b, a) if reverse else (a, b)
            z_w, zr = z_pieces[w], zr_smem.at[w]
            if with_out:
                s16.at[w][...] = S.astype(dtype)
            zr[...] = (regs.load(z_w).astype(F32) * mc.bcast(r_st, C, PIECE)).astype(dtype)
            plgpu.commit_smem()
            if interp:
                S_new = S * g + regs.dot(y_smem[...], zr[...], ((0,), (0,)))
                if with_out:
                    s = regs.dot(x_smem[...], y_smem[...], ((1,), (1,)))
                    xs = regs.dot(x_smem[...], s16.at[w][...], ((1,), (0,)))
            elif with_out:  # the three products that do not need P in flight, one wait
                s, xs, S_new = mc.chunk_products(regs, x_smem, y_smem, s16.at[w], zr, S, g, C, PIECE)
            else:
                S_new = mc.state_product(y_smem, zr, S, g)
            if not with_out:
                return S_new
            p16 = (s * M_chunk).astype(dtype)
            o_inter = xs * mc.bcast(r_out, C, PIECE)
            if interp:
                o = o_inter + regs.dot(p16, z_w[...], ((1,), (0,)))
            else:
                o = pl.run_state(lambda acc: plgpu.wgmma(acc, p16, z_w))(plgpu.ACC.init(o_inter))
            # two output slots per warpgroup: at most one store in flight while the next chunk is written
            dst = out_smem.at[w, lax.rem(idx[0], 2)]
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            dst[...] = o.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dst, out_ref.at[bi, hi, pl.ds(n * C, C), piece(w)])
            return S_new

        S_new = lax.cond(wg == 0, lambda: role(0), lambda: role(1))
        return (S_new, M) if with_out else S_new

    def compute(pipeline):
        plgpu.copy_gmem_to_smem(lam_ref.at[hi], lam_smem.at[wg], bars.at[COMPUTE_WGS + wg])
        if from_zero:  # local state walks of segments start from zero: nothing to load
            S0 = regs.zeros((Dy, PIECE))
        else:
            plgpu.copy_gmem_to_smem(s0_ref.at[bi, hi, si, :, piece(wg)], stage.at[wg], bars.at[wg])
            plgpu.barrier_wait(bars.at[wg])
            S0 = regs.load(stage.at[wg])
        plgpu.barrier_wait(bars.at[COMPUTE_WGS + wg])
        sync()  # both entering states are in registers: the buffers aliasing the staging buffer may be written
        if with_out:  # intra-chunk decay mask, built once: D (forward) or D^T (reverse walk)
            S, _ = pipeline((S0, mc.decay_mask(regs, lam_smem[wg, 0], C, reverse)[0]))
        else:
            S = pipeline(S0)
        plgpu.wait_smem_to_gmem(0)  # this warpgroup's output stores have read their slots
        sync()  # and the other's: the staging buffer aliases them
        stage.at[wg][...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage.at[wg], st_ref.at[bi, hi, si, :, piece(wg)])
        plgpu.wait_smem_to_gmem(0)

    spec = lambda width, j: plgpu.BlockSpec(  # noqa: E731
        block_shape=(C, width), index_map=lambda n: (chunk(n), j), transforms=mc.transforms(dtype))
    specs = [spec(Dy, 0), spec(PIECE, 0), spec(PIECE, 1)]
    srcs = [y_ref.at[bi, hi], z_ref.at[bi, hi], z_ref.at[bi, hi]]
    if with_out:
        specs = [spec(x_ref.shape[-1], 0)] + specs
        srcs = [x_ref.at[bi, hi]] + srcs
    mc.run_warp_specialized(step, compute, specs, srcs, L=L, steps=steps, C=C, chunk=chunk, compute_wgs=COMPUTE_WGS,
                            doc_rows=(first_ref.at[bi], last_ref.at[bi]) if docs else None)


@functools.lru_cache(maxsize=None)
def _launcher(B, H, Tp, Dy, P, dtype, *, T, C, L, seg0, steps, reverse, with_out, docs, from_zero, interpret):
    """One jitted kernel per configuration (as ``gpu_mosaic._walk_launcher``: traced once per program)."""
    W, Dz = COMPUTE_WGS, PIECE * COMPUTE_WGS
    smem16 = lambda shape: mc.smem(shape, dtype)  # noqa: E731
    stage = mc.smem((W, Dy, PIECE), F32)
    zr = smem16((W, C, PIECE))
    union = with_out and not interpret  # the interpreter does not model aliased buffers
    if with_out:
        shared = (smem16((W, Dy, PIECE)), zr, smem16((W, 2, C, PIECE)))
        bufs = plgpu.RefUnion(shared, (stage,)) if union else (*shared, stage)
    else:
        bufs = (zr, stage)
    scratch = [bufs, plgpu.SMEM((W, LAM_PAD), F32), plgpu.Barrier(num_barriers=2 * W), plgpu.Barrier(num_arrivals=W)]
    st_type = jax.ShapeDtypeStruct((B, H, P, Dy, Dz), F32)
    out_type = (jax.ShapeDtypeStruct((B, H, Tp, Dz), dtype), st_type) if with_out else (st_type,)
    kern = functools.partial(_kernel, T=T, C=C, L=L, seg0=seg0, Dy=Dy, dtype=dtype, steps=steps, reverse=reverse,
                             with_out=with_out, docs=docs, from_zero=from_zero, interp=interpret, union=union)
    kw = {"interpret": mc.interpret_params()} if interpret else {}
    return jax.jit(plgpu.kernel(kern, out_type=out_type, scratch_types=scratch, grid=(B, H, P),
                                grid_names=("b", "h", "s"), num_threads=W + 1, thread_name="wg",
                                compiler_params=mc.compiler_params(), **kw))


def wide_walk(x, y, z, lam, s0, *, T, C, L, reverse=False, with_out=True, docs=None, interpret=False, seg0=0,
              segments=None, steps=3):
    """``gpu_mosaic._walk`` with both 64-column pieces of the state in one program (same arguments and results;
    the caller checks ``supported`` and the segment arithmetic): segments seg0 .. seg0 + P - 1 of L chunks, each
    from s0[:, :, i] (or from zero when s0 is None, P = ``segments``). Returns (out [B, H, Tp, 128] or None,
    the state leaving each walked segment [B, H, P, Dy, 128] float32)."""
    B, H, Tp, Dy = y.shape
    Dz = z.shape[-1]
    if not supported(Dy, Dz, interpret):
        raise ValueError(f"wide lightning walk: widths Dy={Dy}, Dz={Dz}; expected Dz={PIECE * COMPUTE_WGS} and "
                         f"Dy = 128 (or 64 in the interpreter)")
    if with_out and x.shape[-1] != Dy:
        raise ValueError(f"wide lightning walk: X is {x.shape[-1]} wide and Y {Dy}; X Y^T needs them equal")
    P = segments if s0 is None else s0.shape[2]
    args = mc.walk_args(x, y, z, lam, s0, docs, with_out=with_out, lam_pad=LAM_PAD)
    steps = min(pipeline_steps(Dy, steps, with_out=with_out, docs=docs is not None), L)
    launch = _launcher(B, H, Tp, Dy, P, jnp.dtype(y.dtype), T=T, C=C, L=L, seg0=seg0, steps=steps,
                       reverse=bool(reverse), with_out=bool(with_out), docs=docs is not None, from_zero=s0 is None,
                       interpret=bool(interpret))
    res = launch(*args)
    return tuple(res) if with_out else (None, res[0])
