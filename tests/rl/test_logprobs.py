"""Chunked float32 per-token log-probabilities against float64 NumPy (values, entropies) and an unchunked
full-logits JAX reference (gradients); the full [tokens, vocab] logits never exist."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.rl.logprobs import token_logprobs


def _inputs(B=3, T=13, H=8, V=37, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k[0], (B, T, H)).astype(jnp.bfloat16)  # bf16 activations: the head still runs in f32
    w = jax.random.normal(k[1], (H, V)) * 0.5
    t = jax.random.randint(k[2], (B, T), 0, V)
    return h, w, t


@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_values_and_entropy_match_float64_numpy(chunk):
    h, w, t = _inputs()
    logp, ent = token_logprobs(h, w, t, chunk_size=chunk)
    assert logp.dtype == jnp.float32 and logp.shape == t.shape
    logits = np.einsum("bth,hv->btv", np.asarray(h.astype(jnp.float32), np.float64), np.asarray(w, np.float64))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0] - lse
    p = np.exp(logits - lse[..., None])
    np.testing.assert_allclose(np.asarray(logp), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-5)


def test_gradients_match_full_logits():
    h, w, t = _inputs(seed=1)
    h = h.astype(jnp.float32)
    coef = jax.random.normal(jax.random.key(2), t.shape)

    def chunked(h, w):
        return jnp.sum(coef * token_logprobs(h, w, t, chunk_size=7)[0])

    def full(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("bth,hv->btv", h, w, precision="highest"), -1)
        return jnp.sum(coef * jnp.take_along_axis(logp, t[..., None], -1)[..., 0])

    for a, b in zip(jax.jit(jax.grad(chunked, (0, 1)))(h, w), jax.grad(full, (0, 1))(h, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # entropy is a metric: no gradient flows through it
    g = jax.grad(lambda w: jnp.sum(token_logprobs(h, w, t, chunk_size=7)[1]))(w)
    assert float(jnp.abs(g).max()) == 0.0


def test_never_builds_full_logits_and_checks_shapes():
    h, w, t = _inputs(B=4, T=64, H=8, V=1000)
    f = lambda h, w: jnp.sum(token_logprobs(h, w, t, chunk_size=32)[0])
    jaxpr = jax.make_jaxpr(jax.grad(f, (0, 1)))(h.astype(jnp.float32), w)

    def shapes(jp):
        for eq in jp.eqns:
            yield from (v.aval.shape for v in eq.outvars if hasattr(v.aval, "shape"))
            for sub in eq.params.values():
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from shapes(getattr(inner, "jaxpr", inner))

    assert max(int(np.prod(s)) for s in shapes(jaxpr.jaxpr)) < 4 * 64 * 1000 // 4
    with pytest.raises(ValueError, match="token_logprobs"):
        token_logprobs(h, w, t[:, :3])
