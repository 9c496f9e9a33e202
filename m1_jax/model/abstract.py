"""The model's structure and parameter shapes without allocating a parameter (``nnx.eval_shape``)."""

from __future__ import annotations

from flax import nnx

from m1_jax.config import ModelConfig
from m1_jax.model.decoder import MiniMaxForCausalLM


def abstract_model(config: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)``: the graph of ``MiniMaxForCausalLM(config)`` and its ``nnx.Param`` state
    whose values are ``jax.ShapeDtypeStruct`` (shape and dtype of every parameter, nothing allocated).

    ``nnx.merge(graphdef, params)`` with real values of the same structure gives the model; the
    parameters are the model's whole state.
    """
    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(seed)))
    return nnx.split(model, nnx.Param)
