"""Whole-model behaviour: gradients, input errors, packing, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import ModelConfig, MiniMaxForCausalLM
from m1_jax.config import FULL, LINEAR

SMALL = dict(num_hidden_layers=4, layer_types=(LINEAR, LINEAR, LINEAR, FULL), block_size=8, vocab_size=61)


def loss_fn(model, ids):
    logits, aux = model(ids, return_aux=True)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return nll + 0.01 * aux


def test_gradients_are_finite_and_match_finite_differences():
    c = ModelConfig.preset("tiny", **SMALL, moe_impl="ragged")
    model = MiniMaxForCausalLM(c, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 19)), jnp.int32)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def f(p):
        return loss_fn(nnx.merge(graphdef, p), ids)

    loss, grads = jax.value_and_grad(f)(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    # Directional derivatives along random directions vs central differences.
    rng = np.random.default_rng(1)
    for trial in range(3):
        # Unit-variance entries: a perturbation large enough to stand above float32 rounding of the loss,
        # small enough (eps) that no token changes its top-k experts.
        direction = jax.tree.map(lambda g: jnp.asarray(rng.standard_normal(g.shape), jnp.float32), grads)
        analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        eps = 1e-3
        plus = f(jax.tree.map(lambda p, d: p + eps * d, params, direction))
        minus = f(jax.tree.map(lambda p, d: p - eps * d, params, direction))
        numeric = float(plus - minus) / (2 * eps)
        assert abs(analytic - numeric) < 2e-2 * max(abs(analytic), 1e-3), (trial, analytic, numeric)


def test_out_of_range_token_ids_raise():
    model = MiniMaxForCausalLM(ModelConfig.preset("tiny", **SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"input_ids out of range: found 61.*vocab_size = 61"):
        model(jnp.array([[1, 2, 61]], jnp.int32))
    with pytest.raises(ValueError, match="found -1"):
        model(jnp.array([[-1, 2]], jnp.int32))
    with pytest.raises(ValueError, match="integer dtype"):
        model(jnp.ones((1, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(jnp.ones((3,), jnp.int32))


def test_out_of_range_ids_under_jit_poison_the_logits_instead_of_clipping():
    model = MiniMaxForCausalLM(ModelConfig.preset("tiny", **SMALL), rngs=nnx.Rngs(0))
    logits = nnx.jit(lambda m, ids: m(ids))(model, jnp.array([[1, 2, 3], [1, 2, 99]], jnp.int32))
    assert bool(jnp.all(jnp.isfinite(logits[0]))) and not bool(jnp.any(jnp.isfinite(logits[1, 2])))


def test_packed_row_equals_documents_alone():
    c = ModelConfig.preset("tiny", **SMALL)
    model = MiniMaxForCausalLM(c, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 61, n) for n in (7, 12, 5)]
    packed = jnp.asarray(np.concatenate(docs)[None], jnp.int32)
    seg = jnp.asarray(np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])[None], jnp.int32)
    packed_logits = np.asarray(model(packed, segment_ids=seg))[0]
    start = 0
    for d in docs:
        alone = np.asarray(model(jnp.asarray(d[None], jnp.int32)))[0]
        np.testing.assert_allclose(packed_logits[start:start + len(d)], alone, rtol=2e-5, atol=2e-5)
        start += len(d)


def test_bfloat16_model_returns_float32_logits_close_to_float32_model():
    c32 = ModelConfig.preset("tiny", **SMALL)
    m32 = MiniMaxForCausalLM(c32, rngs=nnx.Rngs(5))
    m16 = nnx.eval_shape(lambda: MiniMaxForCausalLM(c32.replace(dtype="bfloat16", param_dtype="bfloat16"),
                                                    rngs=nnx.Rngs(5)))
    nnx.update(m16, jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 and a.ndim > 1
                                 and a.shape[-1] != c32.num_local_experts else a, nnx.state(m32)))
    assert m16.blocks.layers[0].block_sparse_moe.gate.value.dtype == jnp.float32  # router stays f32
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 24)), jnp.int32)
    l32, l16 = m32(ids), m16(ids)
    assert l16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(l16 - l32))) < 0.05 * float(jnp.max(jnp.abs(l32))) + 1e-3
