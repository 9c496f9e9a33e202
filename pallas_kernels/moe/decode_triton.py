"""The experts of a decode step in two Pallas kernels (Triton lowering, any CUDA GPU; interpret mode on CPU).

A decode step routes a few (token, choice) pairs, each through one expert. Written in XLA that is about
ten small kernels per layer: three weight gathers, three products, SwiGLU, the combine. At batch 1 their
launches, not their bytes, set the time (H200, 2026-12-01: 0.52 ms for the 16 layers of ``small``, where
reading the routed weights takes 0.02 ms). Here the whole expert computation is two kernels:

* ``up``: grid (pairs, I / BI). A program reads its pair's expert id, then the gate and up columns
  ``w1[e][:, tile]`` and ``w3[e][:, tile]`` straight from the stacked weights (no gathered copy), and
  writes ``silu(x w1) * (x w3)`` for its tile;
* ``down``: grid (tokens, H / BH). A program sums its token's k pairs, ``weight * (h w2[e][:, tile])``.

The products are matrix-vector products: a broadcast multiply and a float32 reduction (tensor cores need
16 rows). Everything accumulates in float32.

``decode_experts(x [N, H], w1, w3 [E, H, I], w2 [E, I, H], experts [N, k], weights [N, k]) -> [N, H]``
(float32). ``decode_experts_reference`` is the same computation in jnp (gathered weights, batched
products).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32


def _pow2_tile(n: int, cap: int = 64) -> int | None:
    """The largest power of two <= ``cap`` dividing ``n`` (at least 8), or None."""
    t = cap
    while t >= 8:
        if n % t == 0:
            return t
        t //= 2
    return None


def supported(hidden: int, inter: int) -> bool:
    """Whether the kernels take these feature sizes (each a multiple of 8)."""
    return _pow2_tile(hidden) is not None and _pow2_tile(inter) is not None


def _up_kernel(e_ref, x_ref, w1_ref, w3_ref, h_ref, *, k, H, BK, BI):
    p, t = pl.program_id(0), pl.program_id(1)
    e, n = e_ref[p], p // k
    cols = pl.ds(pl.multiple_of(t * BI, BI), BI)

    def body(i, acc):
        g, u = acc
        rows = pl.ds(pl.multiple_of(i * BK, BK), BK)
        xk = x_ref[n, rows].astype(F32)[:, None]
        g = g + jnp.sum(xk * w1_ref[e, rows, cols].astype(F32), axis=0)
        u = u + jnp.sum(xk * w3_ref[e, rows, cols].astype(F32), axis=0)
        return g, u

    g, u = lax.fori_loop(0, H // BK, body, (jnp.zeros((BI,), F32), jnp.zeros((BI,), F32)))
    h_ref[...] = g * jax.nn.sigmoid(g) * u


def _down_kernel(e_ref, wt_ref, h_ref, w2_ref, y_ref, *, k, I, BK, BH):
    n, t = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(t * BH, BH), BH)
    acc = jnp.zeros((BH,), F32)
    for j in range(k):  # k is small and static
        p = n * k + j
        e = e_ref[p]

        def body(i, a, e=e, p=p):
            rows = pl.ds(pl.multiple_of(i * BK, BK), BK)
            return a + jnp.sum(h_ref[p, rows][:, None] * w2_ref[e, rows, cols].astype(F32), axis=0)

        acc = acc + wt_ref[p] * lax.fori_loop(0, I // BK, body, jnp.zeros((BH,), F32))
    y_ref[...] = acc


def _check(x, w1, w3, w2, experts, weights):
    N, H = x.shape
    E, _, I = w1.shape
    if w1.shape != (E, H, I) or w3.shape != (E, H, I) or w2.shape != (E, I, H):
        raise ValueError(f"decode_experts: expected w1, w3 [E, {H}, I] and w2 [E, I, {H}], got {w1.shape}, "
                         f"{w3.shape}, {w2.shape}")
    if experts.shape != weights.shape or experts.ndim != 2 or experts.shape[0] != N:
        raise ValueError(f"decode_experts: expected experts and weights [{N}, k], got {experts.shape} and "
                         f"{weights.shape}")
    if not supported(H, I):
        raise ValueError(f"decode_experts: hidden = {H} and intermediate = {I} must be multiples of 8")


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"))
def decode_experts(x, w1, w3, w2, experts, weights, *, interpret: bool = False, num_warps: int = 4):
    """``sum_j weights[n, j] * swiglu_expert(experts[n, j], x[n])`` for every token n: ``[N, H]`` float32.
    Weights of any float dtype (read as stored, products in float32)."""
    _check(x, w1, w3, w2, experts, weights)
    N, H = x.shape
    I = w1.shape[2]
    k = experts.shape[1]
    P = N * k
    BKh, BKi = _pow2_tile(H), _pow2_tile(I)
    # Narrow tiles when there are few pairs: a batch-1 step has 2 pairs, and each program is one SM's
    # stream of weight reads, so more, smaller column tiles keep more SMs reading.
    BI = _pow2_tile(I, 32 if P * I // 64 < 128 else 64)
    BH = _pow2_tile(H, 16 if N * H // 64 < 128 else 64)
    e = experts.reshape(P).astype(jnp.int32)

    def call(kernel, rows, tile, cols, name, *args):
        """One program per (row, column tile) of a ``[rows, cols]`` float32 output; inputs whole (the
        kernels index the routed experts themselves)."""
        return pl.pallas_call(
            kernel, grid=(rows, cols // tile), in_specs=[pl.no_block_spec] * len(args),
            out_specs=pl.BlockSpec((None, tile), lambda r, t: (r, t)),
            out_shape=jax.ShapeDtypeStruct((rows, cols), F32),
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
            interpret=interpret, name=name)(*args)

    h = call(functools.partial(_up_kernel, k=k, H=H, BK=BKh, BI=BI), P, BI, I, "m1_moe_decode_up", e, x, w1, w3)
    return call(functools.partial(_down_kernel, k=k, I=I, BK=BKi, BH=BH), N, BH, H, "m1_moe_decode_down",
                e, weights.reshape(P).astype(F32), h, w2)


def decode_experts_reference(x, w1, w3, w2, experts, weights):
    """The same in jnp: each pair's expert weights gathered, float32 products (the kernels' oracle)."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    xs = jnp.repeat(x.astype(F32), k, axis=0)
    g = jnp.einsum("ph,phi->pi", xs, w1[flat].astype(F32), precision=lax.Precision.HIGHEST)
    u = jnp.einsum("ph,phi->pi", xs, w3[flat].astype(F32), precision=lax.Precision.HIGHEST)
    y = jnp.einsum("pi,pih->ph", jax.nn.silu(g) * u, w2[flat].astype(F32), precision=lax.Precision.HIGHEST)
    return jnp.einsum("nkh,nk->nh", y.reshape(N, k, -1), weights.astype(F32))




@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def moe_decode(x, w1, w3, w2, experts, weights, interpret=False):
    """:func:`decode_experts` with a VJP: the backward is the autodiff of the jnp reference (decode steps
    are rarely differentiated; a tiny training batch can be one)."""
    return decode_experts(x, w1, w3, w2, experts, weights, interpret=interpret)


def _moe_decode_fwd(x, w1, w3, w2, experts, weights, interpret):
    return moe_decode(x, w1, w3, w2, experts, weights, interpret), (x, w1, w3, w2, experts, weights)


def _moe_decode_bwd(interpret, res, g):
    x, w1, w3, w2, experts, weights = res
    _, vjp = jax.vjp(lambda x, w1, w3, w2, wt: decode_experts_reference(x, w1, w3, w2, experts, wt),
                     x, w1, w3, w2, weights)
    dx, dw1, dw3, dw2, dwt = vjp(g)
    return dx, dw1, dw3, dw2, np.zeros(experts.shape, jax.dtypes.float0), dwt


moe_decode.defvjp(_moe_decode_fwd, _moe_decode_bwd)


__all__ = ["decode_experts", "decode_experts_reference", "moe_decode", "supported"]
