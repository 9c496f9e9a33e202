"""The dtype names that configs and command lines use, and their JAX dtypes: the one table."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = tuple(DTYPES)


def as_dtype(name: str):
    """``"bfloat16"`` -> ``jnp.bfloat16``; an unknown name raises naming the choices."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}: expected one of {DTYPE_NAMES}") from None
