"""Weights cast once to the compute dtype (generation with float32 master weights): the model computes
the same values on them, in the full forward and in cached generation; the router and LM head stay
float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig, generate
from m1_jax.config import FULL, LINEAR
from m1_jax.inference.engine import Session
from m1_jax.model.compute_weights import FLOAT32_PARAMS, cast_to_compute_dtype, needs_cast

V = 97


@pytest.fixture(scope="module")
def mixed():
    """float32 parameters, bfloat16 compute (the training and RL setting)."""
    c = ModelConfig.preset("tiny", num_hidden_layers=4, layer_types=(LINEAR, LINEAR, FULL, LINEAR), vocab_size=V,
                           dtype="bfloat16", param_dtype="float32", num_local_experts=8)
    return MiniMaxForCausalLM(c, rngs=nnx.Rngs(3))


def _leaves(state):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_every_weight_but_the_router_and_head_is_cast(mixed):
    graph, params = nnx.split(mixed)
    assert needs_cast(params, mixed.config)
    cast = _leaves(cast_to_compute_dtype(params, mixed.config))
    kept = {k for k, v in cast.items() if v.dtype == jnp.float32}
    assert kept and all(any(f"'{n}']" in k for n in FLOAT32_PARAMS) for k in kept), kept
    assert any("'w1'" in k and v.dtype == jnp.bfloat16 for k, v in cast.items())
    # nothing to do when the parameters are already in the compute dtype, or narrower than it
    assert not needs_cast(params, mixed.config.replace(dtype="float32"))
    assert not needs_cast(nnx.split(MiniMaxForCausalLM(mixed.config.replace(param_dtype="bfloat16"),
                                                       rngs=nnx.Rngs(0)))[1], mixed.config)


def test_the_forward_on_cast_weights_equals_the_forward_on_float32_weights(mixed):
    """Bitwise: the forward casts those weights to bfloat16 where it uses them, so casting earlier changes
    nothing. A new parameter used in float32 that is missing from FLOAT32_PARAMS fails this."""
    graph, params = nnx.split(mixed)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 13)), jnp.int32)
    fwd = jax.jit(lambda p, ids: nnx.merge(graph, p)(ids))
    a = fwd(params, ids)
    b = fwd(cast_to_compute_dtype(params, mixed.config), ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generation_casts_once_and_gives_the_same_tokens_and_logprobs(mixed):
    ids = np.random.default_rng(1).integers(0, V, (3, 9)).astype(np.int32)
    kw = dict(max_new_tokens=6, lengths=[9, 4, 1], temperature=0.8, top_k=20, seed=4)
    s = Session(mixed, ids, **kw)
    assert {v.dtype for k, v in _leaves(s.params).items() if "'w2'" in k} == {jnp.dtype(jnp.bfloat16)}
    cast = generate(mixed, ids, **kw)
    plain = generate(mixed, ids, cast_weights=False, **kw)
    np.testing.assert_array_equal(np.asarray(cast[0]), np.asarray(plain[0]))
    np.testing.assert_array_equal(np.asarray(cast[1]), np.asarray(plain[1]))
