"""Small building blocks: parameter creation with logical axis names, dtypes, RMSNorm."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax.dtypes import as_dtype  # noqa: F401  (re-exported: model code imports it from here)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype,
          *, init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter carrying logical axis names (``sharding.rules`` maps them onto the mesh)."""
    if len(axes) != len(shape):
        raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for a {len(shape)}-d shape {tuple(shape)}")
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "normal":
        value = (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)
    else:
        raise ValueError(f"param: unknown init {init!r}")
    return nnx.Param(value, sharding_names=tuple(axes), eager_sharding=False)


def rms_normalize(x: jax.Array, eps: float, axes: int | tuple[int, ...] = -1) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps)`` computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=axes, keepdims=True)
    return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama-style RMSNorm: float32 statistics, weight multiplied after casting back (no 1 + w)."""

    def __init__(self, shape: int | Sequence[int], eps: float, *, axes: Sequence[str | None], param_dtype,
                 rngs: nnx.Rngs | None = None):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.weight = param(rngs, shape, axes, param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        nd = self.weight.value.ndim
        y = rms_normalize(x, self.eps, tuple(range(-nd, 0)))
        return y * self.weight.value.astype(x.dtype)
