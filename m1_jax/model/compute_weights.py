"""Parameters cast to the compute dtype once, instead of at every use.

The forward casts every weight to ``config.dtype`` where it uses it, except the router (``gate``), which
always runs in float32, and the LM head (``lm_head``), which runs in float32 unless a loss asks for
16-bit head operands. Two callers cast the tree up front:

* the training step with ``TrainConfig.cast_params`` (once per step; gradients flow back through the
  cast to the float32 master weights);
* the generation engine, for float32 parameters with a 16-bit ``config.dtype`` (a training checkpoint,
  the RL loop's policy). Without it every decode step reads the float32 weights, then writes and reads
  their 16-bit copies. The cast gives the same values, because it is the same cast done earlier, and
  halves the weight bytes a step reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m1_jax.config import ModelConfig
from m1_jax.model.layers import as_dtype

ROUTER, HEAD = "gate", "lm_head"
# Parameters the forward uses in float32 whatever ``config.dtype`` is (the head: in generation).
FLOAT32_PARAMS = (ROUTER, HEAD)


def _names(path) -> set:
    return {getattr(k, "key", None) for k in path}


def _casts(path, x, dt, keep_head: bool, narrowing_only: bool) -> bool:
    names = _names(path)
    if ROUTER in names or (keep_head and HEAD in names) or not jnp.issubdtype(x.dtype, jnp.floating):
        return False
    return jnp.dtype(x.dtype).itemsize > dt.itemsize if narrowing_only else x.dtype != dt


def cast_params(params, dtype, *, keep_head: bool = True, narrowing_only: bool = False):
    """The parameter tree (an ``nnx.State`` or any pytree of arrays) with its float weights in ``dtype``;
    the router stays as it is, and so does the LM head with ``keep_head``. ``narrowing_only`` casts only
    weights stored wider than ``dtype``."""
    dt = jnp.dtype(as_dtype(dtype) if isinstance(dtype, str) else dtype)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x.astype(dt) if _casts(p, x, dt, keep_head, narrowing_only) else x, params)


def needs_cast(params, config: ModelConfig) -> bool:
    """Whether :func:`cast_to_compute_dtype` changes anything: some weight the forward casts down to
    ``config.dtype`` is stored wider."""
    dt = jnp.dtype(as_dtype(config.dtype))
    return any(_casts(p, x, dt, True, True) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])


def cast_to_compute_dtype(params, config: ModelConfig):
    """``params`` as generation reads them: weights stored wider than ``config.dtype`` cast to it, the
    router and the LM head kept. The model on the result computes the same values."""
    return cast_params(params, config.dtype, keep_head=True, narrowing_only=True)


__all__ = ["FLOAT32_PARAMS", "cast_params", "cast_to_compute_dtype", "needs_cast"]
