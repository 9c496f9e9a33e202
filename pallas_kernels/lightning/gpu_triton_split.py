"""Two-stage forward with a split state pass (Triton lowering), for prefill shapes.

(``mode="fused"`` is a third variant, see ``fwd_segments_fused``: not yet timed on a GPU.)

The state pass of the plain two-stage forward (``gpu_triton.chunk_states``) walks all N chunks in
sequence, which is the critical path when batch x heads is small. Here the chunks are cut into P
segments of L chunks, walked in parallel from a zero state:

1. ``_local_states_kernel`` (grid B, H, Dk/BK, Dv/BV, P): the local state entering every chunk and
   each segment's local final state ``M_p``.
2. XLA (tiny, P x Dk x Dv per head): the state entering each segment,
   ``Z_p = exp(-lam p L C) h0 + sum_{j<p} exp(-lam (p-1-j) L C) M_j``, and the final state.
3. ``_out_kernel`` (parallel over b, h, chunk, value tile): the true entering state of chunk
   n = p L + j is ``S_n = local_n + exp(-lam j C) Z_p``, then ``o = a (Q S_n) + ((Q K^T) * D) V``.

Exponents are masked/clamped before ``exp``; states and sums are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.lightning import common as cm
from pallas_kernels.lightning import gpu_triton as gt
from pallas_kernels.lightning import triton_common as tc

F32 = jnp.float32


def pick_segment(N, target):
    """Largest divisor L of N with L <= target (segments must tile the chunks exactly)."""
    for L in range(min(target, N), 0, -1):
        if N % L == 0:
            return L
    return 1


def _join(M, decay, h0, *, T, C, L):
    """Segment entering states ``Z [B, H, P, Dk, Dv]`` and the final state from the segments' local
    final states ``M`` (float32)."""
    Z = cm.segment_join(M, decay, h0, T=T, C=C, L=L)
    last_rows = float(T - (M.shape[2] - 1) * L * C)
    ht = jnp.exp(-decay.astype(F32) * last_rows)[None, :, None, None] * Z[:, :, -1] + M[:, :, -1]
    return Z, ht


def _memory_kernel(lam_ref, k_ref, v_ref, m_ref, *, T, C, L, prec):
    """A segment's local final state (from zero), no per-chunk writes."""
    lam = lam_ref[0]
    p = pl.program_id(4)
    row, _ = cm.iota_row_col(C)

    def body(j, S):
        b, g = cm.state_decay(lam, row, cm.real_rows(p * L + j, C, T))
        sl = tc.chunk_slice(j, C)
        return cm.state_update(k_ref[sl, :], v_ref[sl, :], S, b, g, prec)

    m_ref[...] = lax.fori_loop(0, L, body, jnp.zeros(m_ref.shape, F32))


def _seg_fused_kernel(lam_ref, q_ref, k_ref, v_ref, z_ref, o_ref, *, T, C, L, prec):
    """The fused sequential forward over one segment, starting from its entering state."""
    lam = lam_ref[0]
    p = pl.program_id(3)
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)

    def body(j, S):
        sl = tc.chunk_slice(j, C)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        o_ref[sl, :] = cm.fwd_out(q, k, v, S, D, a, prec).astype(o_ref.dtype)
        b, g = cm.state_decay(lam, row, cm.real_rows(p * L + j, C, T))
        return cm.state_update(k, v, S, b, g, prec)

    lax.fori_loop(0, L, body, z_ref[...])


def fwd_segments_fused(q, k, v, decay, h0, *, T, C, L, BK=32, BV=32, BV_fused=64, num_warps=4, num_stages=2,
                       f32_precision="ieee", interpret=False):
    """Three phases without per-chunk states in memory: segment memories (parallel over segments),
    the XLA join, then the fused sequential forward per (segment, value tile) from its entering state."""
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    N = Tp // C
    P = N // L
    BK, BV, BVf = min(BK, Dk), min(BV, Dv), min(BV_fused, Dv)
    prec = tc.precision(q.dtype, f32_precision, interpret)
    kw = dict(compiler_params=tc.compiler_params(num_warps, num_stages), interpret=interpret)
    lam5 = tc.lam_spec(5)
    ks = pl.BlockSpec((None, None, L * C, BK), lambda b, h, i, jv, p: (b, h, p, i))
    vs = pl.BlockSpec((None, None, L * C, BV), lambda b, h, i, jv, p: (b, h, p, jv))
    ms = pl.BlockSpec((None, None, None, BK, BV), lambda b, h, i, jv, p: (b, h, p, i, jv))
    M = pl.pallas_call(
        functools.partial(_memory_kernel, T=T, C=C, L=L, prec=prec),
        out_shape=jax.ShapeDtypeStruct((B, H, P, Dk, Dv), F32),
        grid=(B, H, Dk // BK, Dv // BV, P), in_specs=[lam5, ks, vs], out_specs=ms,
        name="lightning_split_memories", **kw)(decay, k, v)
    Z, ht = _join(M, decay, h0, T=T, C=C, L=L)
    lam4 = tc.lam_spec(4)
    qs = pl.BlockSpec((None, None, L * C, Dk), lambda b, h, jv, p: (b, h, p, 0))
    vt = pl.BlockSpec((None, None, L * C, BVf), lambda b, h, jv, p: (b, h, p, jv))
    zs = pl.BlockSpec((None, None, None, Dk, BVf), lambda b, h, jv, p: (b, h, p, 0, jv))
    o = pl.pallas_call(
        functools.partial(_seg_fused_kernel, T=T, C=C, L=L, prec=prec),
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype),
        grid=(B, H, Dv // BVf, P), in_specs=[lam4, qs, qs, vt, zs], out_specs=vt,
        name="lightning_split_fused", **kw)(decay, q, k, v, Z)
    return o, ht


def _local_states_kernel(lam_ref, k_ref, v_ref, s_ref, m_ref, *, T, C, L, prec):
    lam = lam_ref[0]
    p = pl.program_id(4)
    row, _ = cm.iota_row_col(C)

    def body(j, S):
        n = p * L + j
        s_ref[j] = S.astype(s_ref.dtype)
        b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
        sl = tc.chunk_slice(j, C)
        return cm.state_update(k_ref[sl, :], v_ref[sl, :], S, b, g, prec)

    m_ref[...] = lax.fori_loop(0, L, body, jnp.zeros(m_ref.shape, F32))


def _out_split_kernel(lam_ref, q_ref, k_ref, v_ref, s_ref, z_ref, o_ref, *, C, L, prec):
    lam = lam_ref[0]
    j = lax.rem(pl.program_id(2), L)
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)
    S = s_ref[...].astype(F32) + jnp.exp(-lam * (j * C).astype(F32)) * z_ref[...]
    o_ref[...] = cm.fwd_out(q_ref[...], k_ref[...], v_ref[...], S, D, a, prec).astype(o_ref.dtype)


def fwd(q, k, v, decay, h0, *, T, C, L=16, BK=32, BV=32, BV_out=128, num_warps=4, num_stages=2,
        mode="states", BV_fused=64, f32_precision="ieee", interpret=False):
    """``mode="states"``: per-chunk states through memory, then the parallel output kernel (measured,
    the default). ``mode="fused"``: ``fwd_segments_fused`` (no per-chunk states in memory)."""
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    N = Tp // C
    L = pick_segment(N, L)
    if L * 4 < min(16, N) or N // L < 2:  # no useful split: plain two-stage forward
        return gt.fwd_chunked(q, k, v, decay, h0, T=T, C=C, BK=BK, BV=BV, BV_out=BV_out, num_warps=num_warps,
                              num_stages=num_stages, f32_precision=f32_precision, interpret=interpret)
    if mode == "fused":
        return fwd_segments_fused(q, k, v, decay, h0, T=T, C=C, L=L, BK=BK, BV=BV, BV_fused=BV_fused,
                                  num_warps=num_warps, num_stages=num_stages, f32_precision=f32_precision,
                                  interpret=interpret)
    P = N // L
    BK, BV, BVo = min(BK, Dk), min(BV, Dv), min(BV_out, Dv)
    prec = tc.precision(q.dtype, f32_precision, interpret)
    kw = dict(compiler_params=tc.compiler_params(num_warps, num_stages), interpret=interpret)
    lam5 = tc.lam_spec(5)
    ks = pl.BlockSpec((None, None, L * C, BK), lambda b, h, i, jv, p: (b, h, p, i))
    vs = pl.BlockSpec((None, None, L * C, BV), lambda b, h, i, jv, p: (b, h, p, jv))
    ss = pl.BlockSpec((None, None, L, BK, BV), lambda b, h, i, jv, p: (b, h, p, i, jv))
    ms = pl.BlockSpec((None, None, None, BK, BV), lambda b, h, i, jv, p: (b, h, p, i, jv))
    local, M = pl.pallas_call(
        functools.partial(_local_states_kernel, T=T, C=C, L=L, prec=prec),
        out_shape=(jax.ShapeDtypeStruct((B, H, N, Dk, Dv), q.dtype), jax.ShapeDtypeStruct((B, H, P, Dk, Dv), F32)),
        grid=(B, H, Dk // BK, Dv // BV, P), in_specs=[lam5, ks, vs], out_specs=(ss, ms),
        name="lightning_split_local_states", **kw)(decay, k, v)

    Z, ht = _join(M, decay, h0, T=T, C=C, L=L)

    lam4 = tc.lam_spec(4)
    qs = pl.BlockSpec((None, None, C, Dk), lambda b, h, n, jv: (b, h, n, 0))
    vo = pl.BlockSpec((None, None, C, BVo), lambda b, h, n, jv: (b, h, n, jv))
    st = pl.BlockSpec((None, None, None, Dk, BVo), lambda b, h, n, jv: (b, h, n, 0, jv))
    zs = pl.BlockSpec((None, None, None, Dk, BVo), lambda b, h, n, jv: (b, h, n // L, 0, jv))
    o = pl.pallas_call(
        functools.partial(_out_split_kernel, C=C, L=L, prec=prec),
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype),
        grid=(B, H, N, Dv // BVo), in_specs=[lam4, qs, qs, vo, st, zs], out_specs=vo,
        name="lightning_split_out", **kw)(decay, q, k, v, local, Z)
    return o, ht
