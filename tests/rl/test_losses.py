"""Policy losses against NumPy formulas and their expected gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.rl import cispo_loss, clip_fraction, group_advantages, informative_groups, ppo_clip_loss, unified_loss


def batch(seed=0, B=4, T=9):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 4.0, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)  # ratios well outside [0.8, 1.28] too
    adv = rng.normal(0, 1, (B,)).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) > 0.2).astype(np.float32)
    return logp, old, adv, mask


def test_cispo_value_and_gradient_match_the_formula():
    logp, old, adv, mask = batch()
    eps_low, eps_high = 10.0, 0.28
    w = np.clip(np.exp(logp.astype(np.float64) - old), 1 - eps_low, 1 + eps_high)
    expected = -np.sum(w * adv[:, None] * logp * mask) / mask.sum()
    f = lambda lp: cispo_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), eps_low=eps_low,
                              eps_high=eps_high)
    value, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    assert abs(float(value) - expected) < 1e-5 * abs(expected)
    expected_grad = -w * adv[:, None] * mask / mask.sum()  # sg(w): no token is dropped
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[mask > 0] != 0)


def test_cispo_equals_ppo_on_policy_and_unified_with_wide_masks():
    logp, _, adv, mask = batch(1)
    args = (jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask))
    g_cispo = jax.grad(lambda lp: cispo_loss(lp, *args[1:], eps_low=10.0, eps_high=0.2))(args[0])
    g_ppo = jax.grad(lambda lp: ppo_clip_loss(lp, *args[1:], eps_low=0.2, eps_high=0.28))(args[0])
    np.testing.assert_allclose(np.asarray(g_cispo), np.asarray(g_ppo), rtol=1e-6, atol=1e-8)
    logp, old, adv, mask = batch(2)
    a = (jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    u = unified_loss(*a, eps_is_low=10.0, eps_is_high=0.3, eps_mask_low=1e9, eps_mask_high=1e9)
    c = cispo_loss(*a, eps_low=10.0, eps_high=0.3)
    assert abs(float(u) - float(c)) < 1e-6


def test_ppo_drops_tokens_outside_the_trust_region_that_cispo_keeps():
    logp, old, adv, mask = batch(3)
    a = (jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    g = np.asarray(jax.grad(lambda lp: ppo_clip_loss(lp, *a, eps_low=0.2, eps_high=0.2))(jnp.asarray(logp)))
    r = np.exp(logp.astype(np.float64) - old)
    clipped = ((adv[:, None] > 0) & (r > 1.2)) | ((adv[:, None] < 0) & (r < 0.8))
    assert clipped[mask > 0].any()
    assert np.all(g[clipped & (mask > 0)] == 0) and np.all(g[~clipped & (mask > 0)] != 0)
    frac = float(clip_fraction(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask), eps_low=0.2, eps_high=0.2))
    outside = ((r < 0.8) | (r > 1.2)) & (mask > 0)
    assert abs(frac - outside.sum() / mask.sum()) < 1e-6


def test_token_level_advantages_and_shape_errors():
    logp, old, adv, mask = batch(4)
    per_token = np.repeat(adv[:, None], logp.shape[1], 1)
    a = cispo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), eps_low=1, eps_high=1)
    b = cispo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(per_token), jnp.asarray(mask), eps_low=1,
                   eps_high=1)
    assert float(a) == pytest.approx(float(b))
    with pytest.raises(ValueError, match="advantages"):
        cispo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.ones(3), jnp.asarray(mask), eps_low=1, eps_high=1)
    with pytest.raises(ValueError, match="mask"):
        cispo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.ones((2, 2)), eps_low=1, eps_high=1)


def test_group_advantages_match_numpy():
    rewards = np.random.default_rng(5).normal(size=12).astype(np.float32)
    g = rewards.reshape(3, 4)
    expected = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, 4)), expected, rtol=1e-5)
    same = np.array([1, 1, 1, 0, 1, 0], np.float32)
    assert list(np.asarray(informative_groups(same, 3))) == [False, True]
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(np.ones(5), 4)
