"""Lightning attention for Hopper GPUs (wgmma, TMA) through Pallas Mosaic GPU: forward and backward.

Everything runs on one kernel, ``_walk``: one warpgroup per (batch, head, column tile of BV)
walks the chunks of a sequence (forwards or backwards in time) with ``plgpu.emit_pipeline`` (TMA
streams the x, y, z chunks into swizzled SMEM) and carries a float32 state ``S [Dy, BV]`` as a
WGMMA accumulator in registers. Per chunk of C rows, with row scales ``r_out``, ``r_st`` and the
chunk decay ``g`` (see ``common.py``)::

    forward walk:   M = D          r_out = a   r_st = b
    reverse walk:   M = D^T        r_out = b   r_st = a     (chunks visited last to first)

    P   = (X Y^T) * M                       (wgmma, acc [C, C])
    out = r_out * (X S) + P Z               (wgmma from SMEM bf16(S), then wgmma with P from registers)
    S'  = g S + Y^T (r_st * Z)              (wgmma into an accumulator initialised to g S)

The three products that do not depend on P are issued together and waited on once.

One walk is the forward (X, Y, Z = Q, K, V from h0). The backward is three walks (the formulas of
``common.py`` rearranged, see ``docs/kernels.md``): dQ is a forward walk over (dO, V, K) from h0^T;
dV a reverse walk over (K, Q, dO) from dht, whose final state is d(h0); dK a reverse walk over
(V, dO, Q) from dht^T.

Wide walks (``gpu_mosaic_wide``): where the state is 128 columns wide, one program of two compute warpgroups
and a memory warpgroup walks both 64-column pieces, reading X and Y once. The plan (``segments.forward_plan``,
``backward_plan``) takes them where they are predicted faster: where B * H fills the SMs or a narrow split
would need twice the segments (``tuning={"wide": False | "always"}`` overrides it).

Segments: when B * H * tiles is too small to fill the GPU, every walk is split into P segments
(the count: ``segments.py``): state-only walks from zero (not for the segment whose local state nobody
reads), an XLA join (``common.segment_join``), then the walk from each segment's entering state; the
backward's dq walk reuses the forward's entering states. Packed documents (``segment_ids``,
``doc_bounds``) mask P, a, b and g per chunk and stop states at document starts in the join.

Requirements: bf16/f16 inputs, chunk C = 64, Dk and Dv multiples of 64. Other calls (compiled float32
inputs, which wgmma would round to tf32, and other chunks) use the Triton kernels (``gpu_triton``). Tested on the CPU in the Mosaic GPU interpreter where the installed JAX has one
(``interpret_supported()``); the interpreter's wgmma has no transposed operands, so there the products
run as plain dots on the SMEM values.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.lightning import common as cm
from pallas_kernels.lightning import gpu_mosaic_dkdv as dkdv
from pallas_kernels.lightning import gpu_mosaic_wide as wide_walks
from pallas_kernels.lightning import gpu_triton
from pallas_kernels.lightning import mosaic_common as mc
from pallas_kernels.lightning.segments import (CHUNK, FORWARD_KEYS, LAM_PAD, STRATEGY, backward_plan, forward_plan,
                                              wide_forms)

F32 = jnp.float32
# CHUNK: the kernel's chunk; LAM_PAD: the rates travel as [H, 32] float32 rows (a TMA copy moves a
# multiple of 128 bytes)


_interpret_params = mc.interpret_params
interpret_supported = mc.interpret_supported
_compiler_params = mc.compiler_params
_transforms = mc.transforms


def supported_call(dtype, C, interpret=False) -> bool:
    """bf16/f16 and chunk 64. In the interpreter float32 runs the kernel too (its products are exact
    there, which lets the tests check the kernel at float32 tolerances); compiled, float32 goes to the
    Triton kernels, since wgmma would round it to tf32."""
    dtypes = (jnp.bfloat16, jnp.float16) + ((jnp.float32,) if interpret else ())
    if interpret and not interpret_supported():
        return False
    return jnp.dtype(dtype) in tuple(map(jnp.dtype, dtypes)) and C == CHUNK


def supported(q, v, C, interpret=False) -> bool:
    """``supported_call`` and head dims that are multiples of 64 (``lightning_pallas`` pads them)."""
    return supported_call(q.dtype, C, interpret) and q.shape[-1] % 64 == 0 and v.shape[-1] % 64 == 0


def _walk_kernel(*refs, T, C, L, seg0, BV, Dy, steps, dtype, reverse, with_out, docs, interp, lean, from_zero):
    refs = list(refs)
    first_ref, last_ref = (refs.pop(0), refs.pop(0)) if docs else (None, None)
    if with_out:
        x_ref, y_ref, z_ref, *refs = refs
    else:  # state only: no X, no outputs
        x_ref, (y_ref, z_ref, *refs) = None, refs
    s0_ref = None if from_zero else refs.pop(0)
    lam_ref, *refs = refs
    out_ref, st_ref, *refs = refs if with_out else [None] + refs
    s16_smem, *refs = refs if with_out else [None] + refs
    zr_smem, *refs = refs
    out_smem, *refs = refs if with_out else [None] + refs
    st_smem, *refs = [None] + refs if lean else refs  # lean: the state buffer is scoped (see _walk)
    lam_smem, bars = refs
    bi, hi, ji, si = (lax.axis_index(a) for a in ("b", "h", "j", "s"))
    cols = pl.ds(ji * BV, BV)
    regs = mc.Regs(interp)
    st_type = plgpu.SMEM((Dy, BV), F32, transforms=_transforms(F32))

    def with_state_buffer(f):
        """f(st_smem) on the float32 [Dy, BV] staging buffer: a kernel-long scratch, or in lean mode one
        scoped to this use, whose shared memory the pipeline's buffers reuse."""
        return pl.run_scoped(f, st_type) if lean else f(st_smem)

    load_wg, zeros, load_rows, dot = regs.load, regs.zeros, regs.load_rows, regs.dot

    plgpu.copy_gmem_to_smem(lam_ref.at[hi], lam_smem, bars.at[1])
    if from_zero:  # local state walks of segments start from zero: nothing to load
        S0 = zeros((Dy, BV))
    else:
        def load_state(buf):
            plgpu.copy_gmem_to_smem(s0_ref.at[bi, hi, si, :, cols], buf, bars.at[0])
            plgpu.barrier_wait(bars.at[0])
            return load_wg(buf)
        S0 = with_state_buffer(load_state)
    plgpu.barrier_wait(bars.at[1])
    lam = lam_smem[0]  # scalar rate of this head
    rows = regs.iota((C,), 0).astype(F32)

    c2 = M = None
    if with_out:  # intra-chunk decay mask, built once: D (forward) or D^T (reverse walk)
        M, c2 = mc.decay_mask(regs, lam, C, reverse)
    # the chunk a pipeline step visits: reverse walks take a segment's chunks last to first
    # (seg0: the walk's segments are the sequence's segments seg0, seg0 + 1, ...)
    seg = si + seg0
    chunk = (lambda i: seg * L + L - 1 - i) if reverse else (lambda i: seg * L + i)

    def bcast(row, width):
        return mc.bcast(row, C, width)

    def step(idx, *bufs):
        if docs:
            first_smem, last_smem, *bufs = bufs
        x_smem, y_smem, z_smem, S = bufs if with_out else [None] + list(bufs)
        n = chunk(idx[0])
        # Real rows of this chunk: the last may be short, chunks past T have none (identity steps).
        m = jnp.clip(T - n * C, 0, C).astype(F32)
        M_chunk = M
        if docs:  # packed documents: see doc_bounds
            first, last = load_rows(first_smem), load_rows(last_smem)
            a, b, g = mc.chunk_decays(regs, lam, rows, m, C, docs=(first, last, first_smem))
            if with_out:
                M_chunk = mc.doc_mask(regs, M, c2, first, last, C, reverse)
        else:
            a, b, g = mc.chunk_decays(regs, lam, rows, m, C)
        r_out, r_st = (b, a) if reverse else (a, b)

        # Operands of the products that do not need P: bf16(S) and r_st * Z, in SMEM.
        if with_out:
            s16_smem[...] = S.astype(dtype)
        zr_smem[...] = (load_wg(z_smem).astype(F32) * bcast(r_st, BV)).astype(dtype)
        plgpu.commit_smem()
        if interp:
            S_new = S * g + dot(y_smem[...], zr_smem[...], ((0,), (0,)))
            if with_out:
                s = dot(x_smem[...], y_smem[...], ((1,), (1,)))
                xs = dot(x_smem[...], s16_smem[...], ((1,), (0,)))
        elif with_out:  # three products in flight, one wait
            s, xs, S_new = mc.chunk_products(regs, x_smem, y_smem, s16_smem, zr_smem, S, g, C, BV)
        else:
            S_new = mc.state_product(y_smem, zr_smem, S, g)
        if not with_out:
            return S_new

        p16 = (s * M_chunk).astype(dtype)
        o_inter = xs * bcast(r_out, BV)
        if interp:
            o = o_inter + dot(p16, z_smem[...], ((1,), (0,)))
        else:
            o = pl.run_state(lambda acc: plgpu.wgmma(acc, p16, z_smem))(plgpu.ACC.init(o_inter))

        # Outputs leave through SMEM and TMA stores: two slots (at most one store in flight while the next
        # chunk is written), or in lean mode one slot (its store must have read it before the next write).
        if lean:
            dst = out_smem
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        else:
            dst = out_smem.at[lax.rem(idx[0], 2)]
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        dst[...] = o.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dst, out_ref.at[bi, hi, pl.ds(n * C, C), cols])
        return S_new

    tiling, swizzle = _transforms(dtype)
    spec = lambda width, im: plgpu.BlockSpec(block_shape=(C, width), index_map=im, transforms=(tiling, swizzle))
    specs = [spec(Dy, lambda n: (chunk(n), 0)), spec(BV, lambda n: (chunk(n), ji))]
    srcs = [y_ref.at[bi, hi], z_ref.at[bi, hi]]
    if with_out:
        specs = [spec(x_ref.shape[-1], lambda n: (chunk(n), 0))] + specs
        srcs = [x_ref.at[bi, hi]] + srcs
    if docs:
        rows_spec = plgpu.BlockSpec(block_shape=(C,), index_map=lambda n: (chunk(n),))
        specs = [rows_spec, rows_spec] + specs
        srcs = [first_ref.at[bi], last_ref.at[bi]] + srcs
    pipe = plgpu.emit_pipeline(step, grid=(L,), in_specs=specs, max_concurrent_steps=steps, init_carry=S0)
    S = pipe(*srcs)

    def store_state(buf):
        buf[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, st_ref.at[bi, hi, si, :, cols])
        plgpu.wait_smem_to_gmem(0)
    with_state_buffer(store_state)


@functools.lru_cache(maxsize=None)
def _walk_launcher(B, H, Tp, Dy, Dz, P, dtype, *, T, C, L, seg0, BV, steps, reverse, with_out, docs, interpret,
                   lean, from_zero):
    """One jitted kernel per configuration. Every lightning layer of a model calls the same function object,
    so JAX traces and lowers each kernel configuration once per program instead of once per layer (the
    Mosaic GPU lowering is most of a train step's lowering time)."""
    smem16 = lambda shape: plgpu.SMEM(shape, dtype, transforms=_transforms(dtype))  # noqa: E731
    # float32 state buffer: 128-byte swizzled rows of 32 floats (TMA in/out, WGMMA-layout loads/stores).
    smem32 = [] if lean else [plgpu.SMEM((Dy, BV), F32, transforms=_transforms(F32))]
    tail = smem32 + [plgpu.SMEM((LAM_PAD,), F32), plgpu.Barrier(num_barriers=2)]
    st_type = jax.ShapeDtypeStruct((B, H, P, Dy, Dz), F32)
    if with_out:
        out_slots = (C, BV) if lean else (2, C, BV)
        scratch = [smem16((Dy, BV)), smem16((C, BV)), smem16(out_slots)] + tail
        out_type = (jax.ShapeDtypeStruct((B, H, Tp, Dz), dtype), st_type)
    else:
        scratch = [smem16((C, BV))] + tail
        out_type = (st_type,)
    kern = functools.partial(_walk_kernel, T=T, C=C, L=L, seg0=seg0, BV=BV, Dy=Dy, steps=steps, dtype=dtype,
                             reverse=reverse, with_out=with_out, docs=docs, interp=interpret, lean=lean,
                             from_zero=from_zero)
    kw = {"interpret": _interpret_params()} if interpret else {}
    return jax.jit(plgpu.kernel(kern, out_type=out_type, scratch_types=scratch, grid=(B, H, Dz // BV, P),
                                grid_names=("b", "h", "j", "s"), compiler_params=_compiler_params(), **kw))


def _walk(x, y, z, lam, s0, *, T, C, reverse=False, BV=64, steps=2, with_out=True, docs=None, interpret=False,
          L=None, seg0=0, segments=None, lean=False, wide=False):
    """Walks over the chunks of segments at once: segment p covers chunks [p L, (p + 1) L), the walk
    visits segments seg0 .. seg0 + P - 1 (P = s0.shape[2], or ``segments`` when s0 is None: walks
    from a zero state) and starts segment seg0 + i from s0[:, :, i]. ``L``: chunks per segment
    (default: all chunks split into P).

    ``docs``: None, or ``doc_bounds`` of packed rows (the state restarts at each document start).
    ``lean``: one output slot and a scoped state buffer (less shared memory, more programs per SM).
    ``wide``: where Z is 128 wide (``gpu_mosaic_wide.supported``), one program walks both column pieces
    (``BV`` and ``lean`` do not apply).

    Returns (out [B, H, Tp, Dz] in y's dtype, or None without ``with_out``; the state leaving each
    walked segment [B, H, P, Dy, Dz] float32).
    """
    B, H, Tp, Dy = y.shape
    Dz = z.shape[-1]
    P = segments if s0 is None else s0.shape[2]
    N = Tp // C
    if L is None:
        if N % P:
            raise ValueError(f"mosaic_gpu lightning kernel: {N} chunks do not split into {P} segments")
        L = N // P
    if (seg0 + P) * L > N:
        raise ValueError(f"mosaic_gpu lightning kernel: segments {seg0}..{seg0 + P - 1} of {L} chunks exceed "
                         f"the {N} chunks")
    if wide and wide_walks.supported(Dy, Dz, interpret):
        return wide_walks.wide_walk(x, y, z, lam, s0, T=T, C=C, L=L, reverse=reverse, with_out=with_out, docs=docs,
                                    interpret=interpret, seg0=seg0, segments=P, steps=steps)
    BV = min(BV, Dz)
    if Dz % BV:
        raise ValueError(f"mosaic_gpu lightning kernel: the column tile BV={BV} must divide the head dim {Dz}")
    args = mc.walk_args(x, y, z, lam, s0, docs, with_out=with_out, lam_pad=LAM_PAD)
    launch = _walk_launcher(B, H, Tp, Dy, Dz, P, jnp.dtype(y.dtype), T=T, C=C, L=L, seg0=seg0, BV=BV,
                            steps=max(1, min(steps, L)), reverse=bool(reverse), with_out=bool(with_out),
                            docs=docs is not None, interpret=bool(interpret), lean=bool(lean), from_zero=s0 is None)
    res = launch(*args)
    return tuple(res) if with_out else (None, res[0])


# ----------------------------------------------------------------------------------------------
# Segments: parallelism when B * H cannot fill the GPU (the count: segments.py)
# ----------------------------------------------------------------------------------------------

class DocBounds(NamedTuple):
    """Packed documents, per row and chunk-local (int32 [B, Tp]): ``first`` is the row where the row's
    document starts, -1 when it continues from before the chunk; ``last`` is the row where it ends,
    clamped to C - 1. ``reset [B, P]``: a document starts somewhere in segment p."""

    first: jax.Array
    last: jax.Array
    reset: jax.Array


def doc_bounds(segment_ids, Tp, C, P) -> DocBounds:
    """From ``segment_ids [B, T]`` (a document starts where the id changes; padded rows continue the last
    document, the initial state belongs to the first)."""
    B, T = segment_ids.shape
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)), mode="edge")
    start = jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    pos = jnp.arange(Tp, dtype=jnp.int32)[None]
    chunk0 = (pos // C) * C
    latest = lax.cummax(jnp.where(start, pos, -1), axis=1)  # latest start at or before each row
    first = jnp.where(latest >= chunk0, latest - chunk0, -1)
    # earliest start after each row; the row's document ends just before it
    nxt = lax.cummin(jnp.where(start, pos, Tp), axis=1, reverse=True)
    nxt_after = jnp.concatenate([nxt[:, 1:], jnp.full((B, 1), Tp, jnp.int32)], axis=1)
    last = jnp.minimum(nxt_after - 1 - chunk0, C - 1)
    return DocBounds(first.astype(jnp.int32), last.astype(jnp.int32), start.reshape(B, P, -1).any(-1))


def _entering_states(y, z, lam, s_in, *, T, C, P, reverse, BV, steps, interpret, docs=None, skip_unused=False,
                     lean=False, wide=False):
    """The state entering each of P segments: local state-only walks from zero, then the join. With
    ``skip_unused`` the segment whose local state no other segment reads (the last one of a forward
    walk, the first of a reverse walk) is not walked."""
    if P == 1:
        return s_in.astype(F32)[:, :, None]
    L = (y.shape[2] // C) // P
    walked = P - 1 if skip_unused else P
    seg0 = 1 if (skip_unused and reverse) else 0
    _, M = _walk(None, y, z, lam, None, T=T, C=C, reverse=reverse, BV=BV, steps=steps, with_out=False,
                 docs=docs, interpret=interpret, L=L, seg0=seg0, segments=walked, lean=lean, wide=wide)
    if walked < P:  # the unread segment's state is never used by the join: zeros stand in
        M = jnp.pad(M, ((0, 0), (0, 0), (1, 0) if reverse else (0, 1), (0, 0), (0, 0)))
    return cm.segment_join(M, lam, s_in.astype(F32), T=T, C=C, L=L, reverse=reverse,
                           reset=None if docs is None else docs.reset)


def _pad_chunks(xs, C, P):
    """Zero rows so that the chunks split into P segments."""
    Tp = xs[0].shape[2]
    N = Tp // C
    Np = -(-N // P) * P
    if Np == N:
        return xs
    return [jnp.pad(x, ((0, 0), (0, 0), (0, (Np - N) * C), (0, 0))) for x in xs]


def _t(s):
    return jnp.swapaxes(s, -1, -2)


def _wide(strat, *states, interpret):
    """The strategy's ``wide`` option (``segments.wide_forms``), or False where the wide walks do not apply to
    walks with these states [Dy, Dz]."""
    wide_forms(strat["wide"])  # checks the value
    return strat["wide"] if all(wide_walks.supported(Dy, Dz, interpret) for Dy, Dz in states) else False


def _forward_plan(B, H, Tp, Dk, Dv, *, C, BV, steps, lean, segments, interpret, strat):
    """(segments, wide) of the forward: ``segments.forward_plan`` with the forward's keys of the strategy."""
    keys = {k: strat[k] for k in FORWARD_KEYS}
    keys["wide"] = _wide(strat, (Dk, Dv), interpret=interpret)
    return forward_plan(B, H, Dv // BV, Tp // C, Dx=Dk, Dy=Dk, BV=BV, steps=steps, lean=lean, segments=segments,
                        **keys)


def _strategy(kw):
    """The strategy keys of a tuning dict (defaults from STRATEGY); the rest are returned separately."""
    strat = {k: kw.pop(k, v) for k, v in STRATEGY.items()}
    return strat, kw


def fwd(q, k, v, decay, h0, *, T, C, BV=64, BK=None, steps=2, segments=None, segment_ids=None, interpret=False,
        return_states=False, **kw):
    """(o, final state), and with ``return_states`` the states entering each segment (None without
    segments), which the backward can reuse (``bwd(fwd_states=...)``). ``segments`` per sequence
    (None: the strategy's rule, see ``STRATEGY``); ``BK`` is the backward's (accepted here so that one
    tuning dict serves both directions). ``segment_ids [B, T]``: packed documents."""
    del BK
    strat, triton_kw = _strategy(dict(kw))
    if not supported(q, v, C, interpret):  # packed rows never come here (op.packed_rows_on_kernel)
        triton_kw.setdefault("f32_precision", "tf32x3")
        out = gpu_triton.fwd_fused(q, k, v, decay, h0, T=T, C=C, BV=BV, interpret=interpret, **triton_kw)
        return out + (None,) if return_states else out
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    BV = min(BV, Dv)
    reuse, lean, skip = strat.pop("reuse_states"), strat.pop("lean"), strat["skip_unused"]
    P, wide = _forward_plan(B, H, Tp, Dk, Dv, C=C, BV=BV, steps=steps, lean=lean, segments=segments,
                            interpret=interpret, strat=strat)
    qp, kp, vp = _pad_chunks([q, k, v], C, P)
    docs = None if segment_ids is None else doc_bounds(segment_ids, qp.shape[2], C, P)
    kw = dict(T=T, C=C, BV=BV, steps=steps, interpret=interpret, docs=docs, lean=lean, wide=wide)
    E = _entering_states(kp, vp, decay, h0, P=P, reverse=False, skip_unused=skip, **kw)
    o, st = _walk(qp, kp, vp, decay, E, **kw)
    out = (o[:, :, :Tp], st[:, :, -1])
    if return_states:
        return out + (E if (P > 1 and reuse) else None,)
    return out


def bwd(q, k, v, decay, h0, do, dht, *, T, C, BK=64, BV=64, steps=2, segments=None, segment_ids=None,
        interpret=False, fwd_states=None, **kw):
    """(dq, dk, dv, dh0) from three walks (see the module docstring), or two where the fused dk/dv walk
    applies (``fused_dkdv``, Dk = Dv = 128; ``gpu_mosaic_dkdv``); the Triton fused backward where Mosaic does
    not apply. With segments, the dq walk starts each segment from the forward's entering
    state (``fwd_states`` from ``fwd(return_states=True)`` when the segment counts agree, else a
    state-only walk) and the dk and dv walks from the state cotangent entering it from the right."""
    strat, triton_kw = _strategy(dict(kw))
    if not supported(q, v, C, interpret):  # packed rows never come here (op.packed_rows_on_kernel)
        triton_kw.setdefault("f32_precision", "tf32x3")
        return gpu_triton.bwd_fused(q, k, v, decay, h0, do, dht, T=T, C=C, BK=BK, BV=BV, interpret=interpret,
                                    **triton_kw)
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    BK, BV = min(BK, Dk), min(BV, Dv)
    reuse, lean, skip = strat.pop("reuse_states"), strat.pop("lean"), strat["skip_unused"]
    if strat["fused_dkdv"] not in (True, False, "always"):
        raise ValueError(f"mosaic_gpu lightning kernel: fused_dkdv={strat['fused_dkdv']!r}; expected True, False "
                         f"or 'always'")
    if not dkdv.supported(Dk, Dv, interpret):
        strat["fused_dkdv"] = False
    # the forward's segment count (as fwd picks it with the same tuning): its states can be reused
    fwd_P = _forward_plan(B, H, Tp, Dk, Dv, C=C, BV=BV, steps=steps, lean=lean, segments=segments,
                          interpret=interpret, strat=strat)[0] if reuse else None
    # wide walks in the backward where all of its walks take them (Dk = Dv = 128)
    strat["wide"] = _wide(strat, (Dk, Dv), (Dv, Dk), interpret=interpret)
    P, fused, wide = backward_plan(B, H, min(Dk // BK, Dv // BV), Tp // C, Dx=max(Dk, Dv), Dy=max(Dk, Dv),
                                   BV=max(BK, BV), steps=steps, lean=lean, segments=segments, fwd_segments=fwd_P,
                                   **strat)
    qp, kp, vp, dop = _pad_chunks([q, k, v, do.astype(q.dtype)], C, P)
    docs = None if segment_ids is None else doc_bounds(segment_ids, qp.shape[2], C, P)
    kw = dict(T=T, C=C, steps=steps, interpret=interpret, docs=docs, lean=lean, wide=wide)
    if fwd_states is not None and fwd_states.shape[2] == P:
        E_fwd = _t(fwd_states)  # [.., Dv, Dk]: the forward's entering states, transposed
    else:
        E_fwd = _entering_states(vp, kp, decay, _t(h0), P=P, reverse=False, BV=BK, skip_unused=skip, **kw)
    dq, _ = _walk(dop, vp, kp, decay, E_fwd, BV=BK, **kw)
    E_rev = _entering_states(qp, dop, decay, dht, P=P, reverse=True, BV=BV, skip_unused=skip, **kw)  # [.., Dk, Dv]
    if fused:  # one walk reads q, k, v, dO once (gpu_mosaic_dkdv)
        dk, dv, dS = dkdv.dkdv_walk(qp, kp, vp, dop, decay, E_rev, T=T, C=C, steps=steps, docs=docs,
                                    interpret=interpret)
    else:
        dv, dS = _walk(kp, qp, dop, decay, E_rev, reverse=True, BV=BV, **kw)
        dk, _ = _walk(vp, dop, qp, decay, _t(E_rev), reverse=True, BV=BK, **kw)
    return dq[:, :, :Tp], dk[:, :, :Tp], dv[:, :, :Tp], dS[:, :, 0]
