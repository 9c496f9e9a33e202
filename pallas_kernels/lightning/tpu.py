"""Lightning attention on TPU through Pallas Mosaic TPU.

Grid ``(B, H, N)`` with the chunk axis last and ``"arbitrary"`` (sequential on a core); the float32
state is a VMEM scratch buffer carried across grid steps, initialised under ``pl.when(n == 0)``.

* forward: one kernel; the final state is an output block resident over the chunk axis, written at
  the last step.
* backward: kernel A walks chunks forward, recomputing the states, and writes dq; kernel B walks
  chunks in reverse (through the index maps) carrying the state cotangent and writes dk, dv and
  d(initial_state).

Inputs come padded to ``Tp = N * C`` rows; ``T`` is the real length (the last chunk's decays use it).
Block rules: C a multiple of 8 (16 for bf16) and Dk, Dv multiples of 128 or the full head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning import common as cm

F32 = jnp.float32


def _params():
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _smem_spec():
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _fwd_kernel(lam_ref, q_ref, k_ref, v_ref, h0_ref, o_ref, ht_ref, s_scr, *, T, C, N, prec):
    h, n = pl.program_id(1), pl.program_id(2)
    lam = lam_ref[h]

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(F32)

    row, col = cm.iota_row_col(C, tpu=True)
    D, a = cm.intra_decay(lam, row, col)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    S = s_scr[...]
    o_ref[...] = cm.fwd_out(q, k, v, S, D, a, prec).astype(o_ref.dtype)
    b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
    S = cm.state_update(k, v, S, b, g, prec)
    s_scr[...] = S

    @pl.when(n == N - 1)
    def _():
        ht_ref[...] = S


def fwd(q, k, v, decay, h0, *, T, C, interpret=False):
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    N = Tp // C
    kern = functools.partial(_fwd_kernel, T=T, C=C, N=N, prec=cm.precision_for(q.dtype))
    blk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, n, 0))
    st = pl.BlockSpec((None, None, Dk, Dv), lambda b, h, n: (b, h, 0, 0))
    return pl.pallas_call(
        kern,
        out_shape=(jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype), jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)),
        grid=(B, H, N),
        in_specs=[_smem_spec(), blk(Dk), blk(Dk), blk(Dv), st],
        out_specs=(blk(Dv), st),
        scratch_shapes=[pltpu.VMEM((Dk, Dv), F32)],
        compiler_params=_params(), interpret=interpret, name="lightning_fwd_tpu",
    )(decay, q, k, v, h0)


def _dq_kernel(lam_ref, k_ref, v_ref, do_ref, h0_ref, dq_ref, s_scr, *, T, C, prec):
    h, n = pl.program_id(1), pl.program_id(2)
    lam = lam_ref[h]

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(F32)

    row, col = cm.iota_row_col(C, tpu=True)
    D, a = cm.intra_decay(lam, row, col)
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    S = s_scr[...]
    dq_ref[...] = cm.bwd_dq(do, v, k, S, D, a, prec).astype(dq_ref.dtype)
    b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
    s_scr[...] = cm.state_update(k, v, S, b, g, prec)


def _dkdv_kernel(lam_ref, q_ref, k_ref, v_ref, do_ref, dht_ref, dk_ref, dv_ref, dh0_ref, ds_scr, *, T, C, N,
                 prec):
    h, it = pl.program_id(1), pl.program_id(2)
    n = N - 1 - it
    lam = lam_ref[h]

    @pl.when(it == 0)
    def _():
        ds_scr[...] = dht_ref[...].astype(F32)

    row, col = cm.iota_row_col(C, tpu=True)
    D, a = cm.intra_decay(lam, row, col)
    b, g = cm.state_decay(lam, row, cm.real_rows(n, C, T))
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    dS = ds_scr[...]
    dk_ref[...] = cm.bwd_dk(do, v, q, dS, D, b, prec).astype(dk_ref.dtype)
    dv_ref[...] = cm.bwd_dv(q, k, do, dS, D, b, prec).astype(dv_ref.dtype)
    dS = cm.dstate_update(q, do, dS, a, g, prec)
    ds_scr[...] = dS

    @pl.when(it == N - 1)
    def _():
        dh0_ref[...] = dS


def bwd(q, k, v, decay, h0, do, dht, *, T, C, interpret=False):
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    N = Tp // C
    prec = cm.precision_for(q.dtype)
    fwd_blk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, n, 0))
    rev_blk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, N - 1 - n, 0))
    st = pl.BlockSpec((None, None, Dk, Dv), lambda b, h, n: (b, h, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, T=T, C=C, prec=prec),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, H, N),
        in_specs=[_smem_spec(), fwd_blk(Dk), fwd_blk(Dv), fwd_blk(Dv), st],
        out_specs=fwd_blk(Dk),
        scratch_shapes=[pltpu.VMEM((Dk, Dv), F32)],
        compiler_params=_params(), interpret=interpret, name="lightning_bwd_dq_tpu",
    )(decay, k, v, do, h0)
    dk, dv, dh0 = pl.pallas_call(
        functools.partial(_dkdv_kernel, T=T, C=C, N=N, prec=prec),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)),
        grid=(B, H, N),
        in_specs=[_smem_spec(), rev_blk(Dk), rev_blk(Dk), rev_blk(Dv), rev_blk(Dv), st],
        out_specs=(rev_blk(Dk), rev_blk(Dv), st),
        scratch_shapes=[pltpu.VMEM((Dk, Dv), F32)],
        compiler_params=_params(), interpret=interpret, name="lightning_bwd_dkdv_tpu",
    )(decay, q, k, v, do, dht)
    return dq, dk, dv, dh0
