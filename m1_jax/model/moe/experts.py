"""The one expert computation of every MoE implementation: SwiGLU through the stacked expert
weights, on rows grouped by expert (one grouped GEMM per projection; gate and up fused or not)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.moe import grouped_matmul

F32 = jnp.float32

# Rows per expert from which an expert product is compute-bound: it does 2 FLOPs per weight and row,
# and a 16-bit weight is 2 bytes, so m rows give m FLOPs per weight byte; Hopper's bf16 ridge is ~200
# (989 TFLOP/s over ~4.8 TB/s).
COMPUTE_BOUND_ROWS_PER_EXPERT = 256


def fuse_gate_up(weight_dtype, compute_dtype, rows_per_expert: float) -> bool:
    """Whether to concatenate ``w1`` and ``w3`` into one ``[E, H, 2I]`` product.

    The concatenation is a copy of both weights. It is free when the weights are cast to the compute
    dtype anyway (float32 master weights: the cast writes the copy), and small beside the FLOPs of a
    compute-bound product, where the wider fused product also runs faster. Otherwise (16-bit weights at
    decode or small-batch shapes, which only read weights) two products read each weight once."""
    return jnp.dtype(weight_dtype) != jnp.dtype(compute_dtype) or rows_per_expert >= COMPUTE_BOUND_ROWS_PER_EXPERT


def silu_mul(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` in float32, back in gate's dtype."""
    return (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(gate.dtype)


def swiglu(h13: jax.Array, inter: int) -> jax.Array:
    """``silu(gate) * up`` of the fused ``[.., 2I]`` projection, in float32, back in h13's dtype."""
    return silu_mul(h13[..., :inter], h13[..., inter:])


def expert_ffn(xs, w1, w3, w2, group_sizes=None, *, backend: str = "auto", interpret: bool = False,
               fuse: bool = True):
    """Rows through their experts; weights ``w1, w3 [E, H, I]``, ``w2 [E, I, H]`` (cast to xs's dtype).

    * ragged: ``xs [M, H]`` sorted by expert, ``group_sizes [E]``; rows past their sum give zeros.
      One ``pallas_kernels.moe.grouped_matmul`` per projection (``backend``: see there).
    * uniform (``group_sizes=None``): ``xs [E, n, H]`` (n rows per expert) or ``[n, H]`` (the same
      rows for every expert) -> ``[E, n, H]``; batched matmuls.

    ``fuse``: gate and up as one product over the concatenated weights (see :func:`fuse_gate_up`),
    else two products. The results are the same.

    Returns xs's dtype.
    """
    dt = xs.dtype
    inter = w1.shape[-1]
    w2 = w2.astype(dt)
    if group_sizes is None:
        if xs.ndim == 2 and xs.shape[0] <= inter:
            # [n, H] x [E, H, I] has no single-GEMM layout (E and I are not adjacent): XLA would transpose the
            # weights. With few rows (decode) copying the rows to every expert is the cheaper copy.
            xs = jnp.broadcast_to(xs, (w1.shape[0],) + xs.shape)
        eq = "nh,ehi->eni" if xs.ndim == 2 else "enh,ehi->eni"

        def up_product(w):
            return jnp.einsum(eq, xs, w.astype(dt))
    else:
        def up_product(w):
            return grouped_matmul(xs, w.astype(dt), group_sizes, backend=backend, interpret=interpret)

    if fuse:
        h = swiglu(up_product(jnp.concatenate([w1, w3], axis=-1)), inter)
    else:
        h = silu_mul(up_product(w1), up_product(w3))
    if group_sizes is None:
        return jnp.einsum("eni,eih->enh", h, w2, preferred_element_type=F32).astype(dt)
    return grouped_matmul(h, w2, group_sizes, backend=backend, interpret=interpret)


__all__ = ["COMPUTE_BOUND_ROWS_PER_EXPERT", "expert_ffn", "fuse_gate_up", "silu_mul", "swiglu"]
