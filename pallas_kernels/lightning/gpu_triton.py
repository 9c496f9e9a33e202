"""Lightning attention on NVIDIA GPUs through Pallas's Triton lowering.

Two strategies (see docs/kernels.md):

* ``fused``: one program per (batch, head, feature tile) walks the whole sequence with a
  ``fori_loop`` over chunks; the float32 state lives in registers. Best when B*H*tiles fills the GPU.
  Forward: one kernel. Backward: three sequential kernels (dq on a forward walk, dk and dv on
  reverse walks carrying the state cotangent; dv's kernel also yields d(initial_state)).
* ``chunked`` (two-stage): a light sequential kernel writes the state entering every chunk, then
  a kernel parallel over (batch, head, chunk, tile) computes outputs. Backward: states again, a
  reverse sequential kernel for the state cotangents, then parallel dq/dk and dv kernels.
  Best for prefill shapes (batch 1, few heads, long T).

All functions take inputs already padded to ``Tp = N * C`` rows (zeros) and the real length ``T``;
the last chunk's decays use its real rows, so the final state is exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from pallas_kernels.lightning import common as cm
from pallas_kernels.lightning import triton_common as tc

F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Fused (sequential) strategy
# ----------------------------------------------------------------------------------------------

def _fwd_fused_kernel(lam_ref, q_ref, k_ref, v_ref, h0_ref, o_ref, ht_ref, *, T, C, N, prec):
    lam = lam_ref[0]
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)

    def body(n, S):
        sl = tc.chunk_slice(n, C)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        o_ref[sl, :] = cm.fwd_out(q, k, v, S, D, a, prec).astype(o_ref.dtype)
        b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
        return cm.state_update(k, v, S, b, g, prec)

    ht_ref[...] = lax.fori_loop(0, N, body, h0_ref[...].astype(F32))


def fwd_fused(q, k, v, decay, h0, *, T, C, BV=64, num_warps=4, num_stages=2, f32_precision="ieee",
              interpret=False):
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    BV = min(BV, Dv)
    N = Tp // C
    prec = tc.precision(q.dtype, f32_precision, interpret)
    kern = functools.partial(_fwd_fused_kernel, T=T, C=C, N=N, prec=prec)
    full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, h, j: (b, h, 0, 0))
    vt = pl.BlockSpec((None, None, Tp, BV), lambda b, h, j: (b, h, 0, j))
    st = pl.BlockSpec((None, None, Dk, BV), lambda b, h, j: (b, h, 0, j))
    out = (jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype), jax.ShapeDtypeStruct((B, H, Dk, Dv), F32))
    return tc.call(kern, out, (B, H, Dv // BV), [tc.lam_spec(3), full(Dk), full(Dk), vt, st], (vt, st),
                   num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                   name="lightning_fwd_fused")(decay, q, k, v, h0)


def _bwd_dq_kernel(lam_ref, k_ref, v_ref, do_ref, h0_ref, dq_ref, *, T, C, N, prec):
    lam = lam_ref[0]
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)

    def body(n, S):
        sl = tc.chunk_slice(n, C)
        k, v, do = k_ref[sl, :], v_ref[sl, :], do_ref[sl, :]
        dq_ref[sl, :] = cm.bwd_dq(do, v, k, S, D, a, prec).astype(dq_ref.dtype)
        b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
        return cm.state_update(k, v, S, b, g, prec)

    lax.fori_loop(0, N, body, h0_ref[...].astype(F32))


def _bwd_dk_kernel(lam_ref, q_ref, v_ref, do_ref, dht_ref, dk_ref, *, T, C, N, prec):
    lam = lam_ref[0]
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)

    def body(it, dS):
        n = N - 1 - it
        sl = tc.chunk_slice(n, C)
        q, v, do = q_ref[sl, :], v_ref[sl, :], do_ref[sl, :]
        b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
        dk_ref[sl, :] = cm.bwd_dk(do, v, q, dS, D, b, prec).astype(dk_ref.dtype)
        return cm.dstate_update(q, do, dS, a, g, prec)

    lax.fori_loop(0, N, body, dht_ref[...].astype(F32))


def _bwd_dv_kernel(lam_ref, q_ref, k_ref, do_ref, dht_ref, dv_ref, dh0_ref, *, T, C, N, prec):
    lam = lam_ref[0]
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)

    def body(it, dS):
        n = N - 1 - it
        sl = tc.chunk_slice(n, C)
        q, k, do = q_ref[sl, :], k_ref[sl, :], do_ref[sl, :]
        b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
        dv_ref[sl, :] = cm.bwd_dv(q, k, do, dS, D, b, prec).astype(dv_ref.dtype)
        return cm.dstate_update(q, do, dS, a, g, prec)

    dh0_ref[...] = lax.fori_loop(0, N, body, dht_ref[...].astype(F32))


def bwd_fused(q, k, v, decay, h0, do, dht, *, T, C, BK=64, BV=64, num_warps=4, num_stages=2,
              f32_precision="ieee", interpret=False):
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    BK, BV = min(BK, Dk), min(BV, Dv)
    N = Tp // C
    prec = tc.precision(q.dtype, f32_precision, interpret)
    kw = dict(num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    seq = lambda d, tile: pl.BlockSpec((None, None, Tp, d), lambda b, h, j: (b, h, 0, j if tile else 0))
    grid_k = (B, H, Dk // BK)
    dq = tc.call(functools.partial(_bwd_dq_kernel, T=T, C=C, N=N, prec=prec),
                 jax.ShapeDtypeStruct(q.shape, q.dtype), grid_k,
                 [tc.lam_spec(3), seq(BK, True), seq(Dv, False), seq(Dv, False),
                  pl.BlockSpec((None, None, BK, Dv), lambda b, h, j: (b, h, j, 0))],
                 seq(BK, True), name="lightning_bwd_dq_fused", **kw)(decay, k, v, do, h0)
    dk = tc.call(functools.partial(_bwd_dk_kernel, T=T, C=C, N=N, prec=prec),
                 jax.ShapeDtypeStruct(k.shape, k.dtype), grid_k,
                 [tc.lam_spec(3), seq(BK, True), seq(Dv, False), seq(Dv, False),
                  pl.BlockSpec((None, None, BK, Dv), lambda b, h, j: (b, h, j, 0))],
                 seq(BK, True), name="lightning_bwd_dk_fused", **kw)(decay, q, v, do, dht)
    st = pl.BlockSpec((None, None, Dk, BV), lambda b, h, j: (b, h, 0, j))
    dv, dh0 = tc.call(functools.partial(_bwd_dv_kernel, T=T, C=C, N=N, prec=prec),
                      (jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)),
                      (B, H, Dv // BV), [tc.lam_spec(3), seq(Dk, False), seq(Dk, False), seq(BV, True), st],
                      (seq(BV, True), st), name="lightning_bwd_dv_fused", **kw)(decay, q, k, do, dht)
    return dq, dk, dv, dh0


# ----------------------------------------------------------------------------------------------
# Chunked (two-stage) strategy
# ----------------------------------------------------------------------------------------------

def _states_kernel(lam_ref, k_ref, v_ref, h0_ref, s_ref, ht_ref, *, T, C, N, prec):
    lam = lam_ref[0]
    row, _ = cm.iota_row_col(C)

    def body(n, S):
        sl = tc.chunk_slice(n, C)
        s_ref[n] = S.astype(s_ref.dtype)
        b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
        return cm.state_update(k_ref[sl, :], v_ref[sl, :], S, b, g, prec)

    ht_ref[...] = lax.fori_loop(0, N, body, h0_ref[...].astype(F32))


def _walk_states(kernel, x, y, decay, s_in, *, T, C, BK, BV, num_warps, num_stages, interpret, name,
                 f32_precision="ieee"):
    """A sequential walk per (b, h, BK x BV state tile) over x [.., Tp, Dk] and y [.., Tp, Dv]: the state
    at every chunk ``[B, H, N, Dk, Dv]`` (in x's dtype) and the state it ends with (float32)."""
    B, H, Tp, Dk = x.shape
    Dv = y.shape[-1]
    BK, BV = min(BK, Dk), min(BV, Dv)
    N = Tp // C
    kern = functools.partial(kernel, T=T, C=C, N=N, prec=tc.precision(x.dtype, f32_precision, interpret))
    lam = pl.BlockSpec((1,), lambda b, h, i, j: (h,))
    xs = pl.BlockSpec((None, None, Tp, BK), lambda b, h, i, j: (b, h, 0, i))
    ys = pl.BlockSpec((None, None, Tp, BV), lambda b, h, i, j: (b, h, 0, j))
    st = pl.BlockSpec((None, None, BK, BV), lambda b, h, i, j: (b, h, i, j))
    ss = pl.BlockSpec((None, None, N, BK, BV), lambda b, h, i, j: (b, h, 0, i, j))
    out = (jax.ShapeDtypeStruct((B, H, N, Dk, Dv), x.dtype), jax.ShapeDtypeStruct((B, H, Dk, Dv), F32))
    return tc.call(kern, out, (B, H, Dk // BK, Dv // BV), [lam, xs, ys, st], (ss, st), num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret, name=name)(decay, x, y, s_in)


def chunk_states(k, v, decay, h0, *, T, C, BK=64, BV=64, num_warps=4, num_stages=2, f32_precision="ieee",
                 interpret=False):
    """States entering every chunk ``[B, H, N, Dk, Dv]`` (in k's dtype) and the final state (float32)."""
    return _walk_states(_states_kernel, k, v, decay, h0, T=T, C=C, BK=BK, BV=BV, num_warps=num_warps,
                        num_stages=num_stages, interpret=interpret, name="lightning_chunk_states",
                        f32_precision=f32_precision)


def _out_kernel(lam_ref, q_ref, k_ref, v_ref, s_ref, o_ref, *, C, prec):
    lam = lam_ref[0]
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)
    o_ref[...] = cm.fwd_out(q_ref[...], k_ref[...], v_ref[...], s_ref[...], D, a, prec).astype(o_ref.dtype)


def chunk_out(q, k, v, decay, states, *, C, BV=64, num_warps=4, num_stages=2, f32_precision="ieee",
              interpret=False):
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    BV = min(BV, Dv)
    N = Tp // C
    kern = functools.partial(_out_kernel, C=C, prec=tc.precision(q.dtype, f32_precision, interpret))
    qs = pl.BlockSpec((None, None, C, Dk), lambda b, h, n, j: (b, h, n, 0))
    vs = pl.BlockSpec((None, None, C, BV), lambda b, h, n, j: (b, h, n, j))
    ss = pl.BlockSpec((None, None, None, Dk, BV), lambda b, h, n, j: (b, h, n, 0, j))
    return tc.call(kern, jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype), (B, H, N, Dv // BV),
                   [tc.lam_spec(4), qs, qs, vs, ss], vs, num_warps=num_warps, num_stages=num_stages,
                   interpret=interpret, name="lightning_chunk_out")(decay, q, k, v, states)


def fwd_chunked(q, k, v, decay, h0, *, T, C, BK=64, BV=64, BV_out=64, num_warps=4, num_stages=2,
                f32_precision="ieee", interpret=False):
    kw = dict(num_warps=num_warps, num_stages=num_stages, f32_precision=f32_precision, interpret=interpret)
    states, ht = chunk_states(k, v, decay, h0, T=T, C=C, BK=BK, BV=BV, **kw)
    o = chunk_out(q, k, v, decay, states, C=C, BV=BV_out, **kw)
    return o, ht


def _dstates_kernel(lam_ref, q_ref, do_ref, dht_ref, ds_ref, dh0_ref, *, T, C, N, prec):
    lam = lam_ref[0]
    row, col = cm.iota_row_col(C)
    _, a = cm.intra_decay(lam, row, col)

    def body(it, dS):
        n = N - 1 - it
        sl = tc.chunk_slice(n, C)
        ds_ref[n] = dS.astype(ds_ref.dtype)
        _, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
        return cm.dstate_update(q_ref[sl, :], do_ref[sl, :], dS, a, g, prec)

    dh0_ref[...] = lax.fori_loop(0, N, body, dht_ref[...].astype(F32))


def chunk_dstates(q, do, decay, dht, *, T, C, BK=64, BV=64, num_warps=4, num_stages=2, f32_precision="ieee",
                  interpret=False):
    """Cotangents of the states leaving every chunk ``[B, H, N, Dk, Dv]`` and d(initial_state)."""
    # The chunk decay uses each chunk's real rows (the last may be short; padded rows have q = dO = 0).
    return _walk_states(_dstates_kernel, q, do, decay, dht, T=T, C=C, BK=BK, BV=BV, num_warps=num_warps,
                        num_stages=num_stages, interpret=interpret, name="lightning_chunk_dstates",
                        f32_precision=f32_precision)


def _dqdk_kernel(lam_ref, q_ref, k_ref, v_ref, do_ref, s_ref, ds_ref, dq_ref, dk_ref, *, T, C, prec):
    lam = lam_ref[0]
    n = pl.program_id(2)
    row, col = cm.iota_row_col(C)
    D, a = cm.intra_decay(lam, row, col)
    b, _ = cm.state_decay(lam, row, cm.real_rows(n, C, T))
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    cd = q.dtype
    dP = (cm.mm(do, v, tb=True, precision=prec) * D).astype(cd)
    dq = cm.mm(dP, k, precision=prec) + a * cm.mm(do, s_ref[...].astype(cd), tb=True, precision=prec)
    dk = cm.mm(dP, q, ta=True, precision=prec) + b * cm.mm(v, ds_ref[...].astype(cd), tb=True, precision=prec)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


def _dv_kernel(lam_ref, q_ref, k_ref, do_ref, ds_ref, dv_ref, *, T, C, prec):
    lam = lam_ref[0]
    n = pl.program_id(2)
    row, col = cm.iota_row_col(C)
    D, _ = cm.intra_decay(lam, row, col)
    b, _ = cm.state_decay(lam, row, cm.real_rows(n, C, T))
    dv_ref[...] = cm.bwd_dv(q_ref[...], k_ref[...], do_ref[...], ds_ref[...], D, b, prec).astype(dv_ref.dtype)


def bwd_chunked(q, k, v, decay, h0, do, dht, *, T, C, BK=64, BV=64, BK_par=64, BV_par=64, num_warps=4,
                num_stages=2, f32_precision="ieee", interpret=False):
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    N = Tp // C
    prec = tc.precision(q.dtype, f32_precision, interpret)
    kw = dict(num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    states, _ = chunk_states(k, v, decay, h0, T=T, C=C, BK=BK, BV=BV, f32_precision=f32_precision, **kw)
    dstates, dh0 = chunk_dstates(q, do, decay, dht, T=T, C=C, BK=BK, BV=BV, f32_precision=f32_precision, **kw)
    BKp, BVp = min(BK_par, Dk), min(BV_par, Dv)
    lam = tc.lam_spec(4)
    tile = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n, j: (b, h, n, j))
    whole = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n, j: (b, h, n, 0))
    srow = pl.BlockSpec((None, None, None, BKp, Dv), lambda b, h, n, j: (b, h, n, j, 0))
    dq, dk = tc.call(functools.partial(_dqdk_kernel, T=T, C=C, prec=prec),
                     (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)),
                     (B, H, N, Dk // BKp), [lam, tile(BKp), tile(BKp), whole(Dv), whole(Dv), srow, srow],
                     (tile(BKp), tile(BKp)), name="lightning_chunk_dqdk", **kw)(decay, q, k, v, do, states, dstates)
    scol = pl.BlockSpec((None, None, None, Dk, BVp), lambda b, h, n, j: (b, h, n, 0, j))
    dv = tc.call(functools.partial(_dv_kernel, T=T, C=C, prec=prec), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 (B, H, N, Dv // BVp), [lam, whole(Dk), whole(Dk), tile(BVp), scol], tile(BVp),
                 name="lightning_chunk_dv", **kw)(decay, q, k, do, dstates)
    return dq, dk, dv, dh0
