"""Lightning attention forward for Hopper (and newer) through Pallas Mosaic GPU.

One warpgroup per (batch, head, value tile of BV columns) walks the sequence with
``plgpu.emit_pipeline`` (TMA streams q, k, v chunks into swizzled SMEM, ``max_concurrent_steps``
deep) and carries the float32 state ``S [Dk, BV]`` as a WGMMA accumulator in registers. Per chunk:

    s  = Q K^T                  (wgmma, acc [C, C])        p = bf16(s * D)
    o  = a * (Q S16) + p V      (wgmma from SMEM S16 = bf16(S), then wgmma with p from registers)
    S' = g S + K^T (b * V)      (wgmma with a transposed SMEM K and the row-scaled V in SMEM)

Requirements: bf16/f16 inputs, chunk C = 64, Dk and Dv multiples of 64. Other calls (float32
inputs, other shapes) and the backward use the Triton kernels (``gpu_triton``). Tested on the CPU
with the Mosaic GPU interpreter where the installed JAX has one (``interpret_supported()``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.lightning import gpu_triton

F32 = jnp.float32
CHUNK = 64


def _interpret_params():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # older JAX: no Mosaic GPU interpreter
        return None
    return InterpretGPUParams()


def interpret_supported() -> bool:
    return _interpret_params() is not None


def _compiler_params():
    sem = getattr(getattr(plgpu, "LoweringSemantics", None), "Lane", None)
    try:
        return plgpu.CompilerParams(approx_math=False, lowering_semantics=sem) if sem is not None else \
            plgpu.CompilerParams(approx_math=False)
    except TypeError:  # a JAX without the field
        return plgpu.CompilerParams(approx_math=False)


def supported(q, v, C) -> bool:
    Dk, Dv = q.shape[-1], v.shape[-1]
    return (jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and C == CHUNK
            and Dk % 64 == 0 and Dv % 64 == 0)


def _kernel(q_ref, k_ref, v_ref, h0_ref, lamc_ref, lamk_ref, o_ref, ht_ref,
            s16_smem, bv_smem, o_smem2, st_smem, lc_smem, lk_smem, bars, *, T, C, N, BV, Dk, steps, dtype,
            interp=False):
    bi, hi, ji = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
    vs = pl.ds(ji * BV, BV)
    wg = plgpu.Layout.WGMMA
    # The CPU interpreter has no layouts: plain iotas and loads there.
    iota = ((lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim)) if interp
            else (lambda dt, shape, dim, layout: plgpu.broadcasted_iota(dt, shape, dim, layout=layout)))
    plgpu.copy_gmem_to_smem(h0_ref.at[bi, hi, :, vs], st_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(lamc_ref.at[hi], lc_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(lamk_ref.at[hi], lk_smem, bars.at[2])
    for i in range(3):
        plgpu.barrier_wait(bars.at[i])
    load2d = (lambda ref: ref[...]) if interp else (lambda ref: plgpu.load(ref, (), layout=wg))
    S0 = load2d(st_smem)
    load1d = (lambda ref: ref[...]) if interp else (lambda ref: plgpu.load(ref, (), layout=wg.reduce(1)))
    lamc = load1d(lc_smem)  # [C], every entry = lambda
    lamk = load1d(lk_smem)  # [Dk]

    lam_cc = lax.broadcast_in_dim(lamc, (C, C), [0])
    row = iota(jnp.int32, (C, C), 0, wg)
    col = iota(jnp.int32, (C, C), 1, wg)
    ninf_cc = jnp.full((C, C), -jnp.inf, F32)
    D = jnp.exp(jnp.where(row >= col, -lam_cc * (row - col).astype(F32), ninf_cc))
    lam_cv = lax.broadcast_in_dim(lamc, (C, BV), [0])
    rv = iota(jnp.int32, (C, BV), 0, wg).astype(F32)
    a2 = jnp.exp(-lam_cv * (rv + 1.0))
    m_last = float(T - (N - 1) * C)
    b_full = jnp.exp(-lam_cv * (C - 1.0 - rv))
    b_last = jnp.exp(jnp.where(m_last - 1.0 - rv >= 0.0, -lam_cv * (m_last - 1.0 - rv),
                               jnp.full((C, BV), -jnp.inf, F32)))
    lam_kv = lax.broadcast_in_dim(lamk, (Dk, BV), [0])
    g_full = jnp.exp(-lam_kv * float(C))
    g_last = jnp.exp(-lam_kv * m_last)

    def mm(a, b, shape, ta=False, tb=False):
        """a @ b (operands SMEM refs, or a register array for ``a``) with a float32 accumulator."""
        if interp:  # the interpreter's wgmma has no transposed operands: plain dots on the values
            av = a if isinstance(a, jax.Array) else a[...]
            dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
            return lax.dot_general(av, b[...], dims, preferred_element_type=F32)

        def body(acc):
            plgpu.wgmma(acc, plgpu.transpose_ref(a, (1, 0)) if ta else a,
                        plgpu.transpose_ref(b, (1, 0)) if tb else b)
            return acc[...]
        return pl.run_scoped(body, plgpu.ACC(shape, F32))

    def step(idx, q_smem, k_smem, v_smem, S):
        n = idx[0]

        s = mm(q_smem, k_smem, (C, C), tb=True)
        p16 = (s * D).astype(dtype)
        s16_smem[...] = S.astype(dtype)
        plgpu.commit_smem()
        # Zero-initialised accumulators, combined in registers.
        o = mm(q_smem, s16_smem, (C, BV)) * a2 + mm(p16, v_smem, (C, BV))
        # Outputs leave through two SMEM slots and explicit TMA stores (one store in flight).
        slot = lax.rem(n, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        o_smem2.at[slot][...] = o.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem2.at[slot], o_ref.at[bi, hi, pl.ds(n * C, C), vs])

        # The last chunk may be short: blend its decays in arithmetically (no select on a scalar).
        lastf = (n == N - 1).astype(F32)
        bb = b_full + lastf * (b_last - b_full)
        gg = g_full + lastf * (g_last - g_full)
        vv = load2d(v_smem).astype(F32)
        bv_smem[...] = (vv * bb).astype(dtype)
        plgpu.commit_smem()

        return S * gg + mm(k_smem, bv_smem, (Dk, BV), ta=True)

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    spec = lambda d, im: plgpu.BlockSpec(block_shape=(C, d), index_map=im, transforms=(tiling, swizzle))
    pipe = plgpu.emit_pipeline(
        step, grid=(N,),
        in_specs=[spec(Dk, lambda n: (n, 0)), spec(Dk, lambda n: (n, 0)), spec(BV, lambda n: (n, ji))],
        max_concurrent_steps=steps, init_carry=S0)
    S = pipe(q_ref.at[bi, hi], k_ref.at[bi, hi], v_ref.at[bi, hi])
    st_smem[...] = S
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(st_smem, ht_ref.at[bi, hi, :, vs])
    plgpu.wait_smem_to_gmem(0)


def _fwd_mosaic(q, k, v, decay, h0, *, T, C, BV=64, steps=2, interpret=False):
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    N = Tp // C
    BV = min(BV, Dv)
    dtype = q.dtype
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    smem16 = lambda shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))
    # float32 state buffer: 128-byte swizzled rows of 32 floats (TMA in/out, WGMMA-layout loads/stores).
    smem32 = plgpu.SMEM((Dk, BV), F32, transforms=(plgpu.TilingTransform((8, 32)), swizzle))
    lamc = jnp.broadcast_to(decay.astype(F32)[:, None], (H, C))
    lamk = jnp.broadcast_to(decay.astype(F32)[:, None], (H, Dk))
    kern = functools.partial(_kernel, T=T, C=C, N=N, BV=BV, Dk=Dk, steps=max(1, min(steps, N)), dtype=dtype,
                             interp=bool(interpret))
    kw = {}
    if interpret:
        kw["interpret"] = _interpret_params()
    return plgpu.kernel(
        kern,
        out_type=(jax.ShapeDtypeStruct((B, H, Tp, Dv), dtype), jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)),
        scratch_types=[smem16((Dk, BV)), smem16((C, BV)), smem16((2, C, BV)), smem32, plgpu.SMEM((C,), F32),
                       plgpu.SMEM((Dk,), F32), plgpu.Barrier(num_barriers=3)],
        grid=(B, H, Dv // BV), grid_names=("b", "h", "j"),
        compiler_params=_compiler_params(),
        **kw,
    )(q, k, v, h0.astype(F32), lamc, lamk)


def fwd(q, k, v, decay, h0, *, T, C, BV=64, steps=2, interpret=False, **triton_kw):
    if supported(q, v, C) and (not interpret or interpret_supported()):
        return _fwd_mosaic(q, k, v, decay, h0, T=T, C=C, BV=BV, steps=steps, interpret=interpret)
    return gpu_triton.fwd_fused(q, k, v, decay, h0, T=T, C=C, BV=BV, interpret=interpret, **triton_kw)


def bwd(q, k, v, decay, h0, do, dht, *, T, C, interpret=False, **kw):
    """Backward through the Triton kernels (fused strategy)."""
    return gpu_triton.bwd_fused(q, k, v, decay, h0, do, dht, T=T, C=C, interpret=interpret, **kw)
