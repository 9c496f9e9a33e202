"""The one expert computation of every MoE implementation: SwiGLU through the stacked expert
weights, on rows grouped by expert (one grouped GEMM per projection; gate and up fused)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.moe import grouped_matmul

F32 = jnp.float32


def swiglu(h13: jax.Array, inter: int) -> jax.Array:
    """``silu(gate) * up`` of the fused ``[.., 2I]`` projection, in float32, back in h13's dtype."""
    g, u = h13[..., :inter], h13[..., inter:]
    return (jax.nn.silu(g.astype(F32)) * u.astype(F32)).astype(h13.dtype)


def expert_ffn(xs, w1, w3, w2, group_sizes=None, *, backend: str = "auto", interpret: bool = False):
    """Rows through their experts; weights ``w1, w3 [E, H, I]``, ``w2 [E, I, H]`` (cast to xs's dtype).

    * ragged: ``xs [M, H]`` sorted by expert, ``group_sizes [E]``; rows past their sum give zeros.
      One ``pallas_kernels.moe.grouped_matmul`` per projection (``backend``: see there).
    * uniform (``group_sizes=None``): ``xs [E, n, H]`` (n rows per expert) or ``[n, H]`` (the same
      rows for every expert) -> ``[E, n, H]``; batched matmuls.

    Returns xs's dtype.
    """
    dt = xs.dtype
    inter = w1.shape[-1]
    w13 = jnp.concatenate([w1, w3], axis=-1).astype(dt)  # one product for gate and up
    w2 = w2.astype(dt)
    if group_sizes is None:
        eq = "nh,ehi->eni" if xs.ndim == 2 else "enh,ehi->eni"
        h = swiglu(jnp.einsum(eq, xs, w13), inter)
        return jnp.einsum("eni,eih->enh", h, w2, preferred_element_type=F32).astype(dt)
    h = swiglu(grouped_matmul(xs, w13, group_sizes, backend=backend, interpret=interpret), inter)
    return grouped_matmul(h, w2, group_sizes, backend=backend, interpret=interpret)


__all__ = ["expert_ffn", "swiglu"]
