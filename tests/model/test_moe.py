"""MoE against a per-expert loop in float64 NumPy."""

import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from m1_jax import ModelConfig
from m1_jax.model import MoE, load_balancing_loss


def per_expert_loop(x, gate, w1, w3, w2, top_k):
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    logits = x @ gate
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        top = np.argsort(-p[n])[:top_k]
        w = p[n, top] / p[n, top].sum()
        for e, we in zip(top, w):
            h = x[n] @ w1[e]
            out[n] += we * (((h / (1 + np.exp(-h))) * (x[n] @ w3[e])) @ w2[e])
    return out, p


@pytest.mark.parametrize("impl", ["ragged", "dense"])
@pytest.mark.parametrize("experts, top_k", [(4, 2), (8, 2), (6, 1), (5, 3)])
def test_moe_matches_per_expert_loop(impl, experts, top_k):
    c = ModelConfig.preset("tiny", num_local_experts=experts, num_experts_per_tok=top_k, moe_impl=impl)
    moe = MoE(c, rngs=nnx.Rngs(experts * 10 + top_k))
    x = np.random.default_rng(experts).standard_normal((3, 11, c.hidden_size)).astype(np.float32)
    w = [np.asarray(p.value, np.float64) for p in (moe.gate, moe.w1, moe.w3, moe.w2)]
    ref, probs = per_expert_loop(x, *w, top_k)
    y, stats = moe(jnp.asarray(x))
    assert moe.gate.value.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.prob_per_expert), probs.mean(0), rtol=1e-5)
    assert np.allclose(np.asarray(stats.tokens_per_expert).sum(-1), 1.0)


def test_load_balancing_loss_is_one_for_uniform_routing():
    E, k = 8, 2
    f = jnp.full((3, k, E), 1.0 / E)
    p = jnp.full((3, E), 1.0 / E)
    from m1_jax.model.moe import RouterStats
    assert abs(float(load_balancing_loss(RouterStats(f, p))) - k) < 1e-6  # E * sum_{j,e} (1/E)(1/E) = k
