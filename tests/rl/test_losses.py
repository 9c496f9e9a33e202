"""Policy losses against NumPy formulas and their expected gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.rl import (cispo_loss, clip_fraction, dropped_fraction, group_advantages, grpo_loss, informative_groups,
                       loss_bounds, policy_loss, ppo_clip_loss, unified_loss)


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


# ------------------------------------------------------------------------------------------- issue 16 / 13
def _np_ratio(logp, old):
    return np.exp(np.clip(logp.astype(np.float64) - old, -20.0, 20.0))


def test_unified_loss_with_finite_mask_bounds_matches_numpy_and_drops_tokens():
    logp, old, adv, mask = batch(6, B=6, T=11)
    is_lo, is_hi, m_lo, m_hi = 10.0, 0.3, 0.2, 0.25
    r = _np_ratio(logp, old)
    A = np.broadcast_to(adv[:, None], r.shape)
    w = np.clip(r, 1 - is_lo, 1 + is_hi)
    drop = ((A > 0) & (r > 1 + m_hi)) | ((A < 0) & (r < 1 - m_lo))
    assert (drop & (mask > 0)).any() and (~drop & (mask > 0)).any()  # both kinds present
    expected = -np.sum(w * A * logp * (1 - drop) * mask) / mask.sum()
    f = lambda lp: unified_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), eps_is_low=is_lo,
                                eps_is_high=is_hi, eps_mask_low=m_lo, eps_mask_high=m_hi)
    value, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), -w * A * (1 - drop) * mask / mask.sum(), rtol=1e-5, atol=1e-8)
    g = np.asarray(grad)
    assert np.all(g[drop] == 0) and np.all(g[~drop & (mask > 0)] != 0)


def test_cispo_keeps_the_gradient_of_tokens_ppo_clips_out():
    logp, old, adv, mask = batch(3)
    a = (jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    r = _np_ratio(logp, old)
    outside = ((adv[:, None] > 0) & (r > 1.2)) | ((adv[:, None] < 0) & (r < 0.8))
    g_ppo = np.asarray(jax.grad(lambda lp: ppo_clip_loss(lp, *a, eps_low=0.2, eps_high=0.2))(jnp.asarray(logp)))
    g_cispo = np.asarray(jax.grad(lambda lp: cispo_loss(lp, *a, eps_low=0.2, eps_high=0.2))(jnp.asarray(logp)))
    sel = outside & (mask > 0)
    assert sel.any() and np.all(g_ppo[sel] == 0) and np.all(g_cispo[sel] != 0)
    w = np.clip(r, 0.8, 1.2)  # CISPO's weight: the capped ratio, a constant (no gradient through it)
    np.testing.assert_allclose(g_cispo, -w * adv[:, None] * mask / mask.sum(), rtol=1e-5, atol=1e-8)
    frac = float(dropped_fraction(jnp.asarray(logp), *a, eps_low=0.2, eps_high=0.2))
    assert abs(frac - sel.sum() / mask.sum()) < 1e-6


def test_cispo_equals_token_level_grpo_on_policy():
    """With the policy equal to the sampler (r = 1) CISPO's gradient is token-level GRPO's (= DAPO's): -A / N."""
    logp, _, adv, mask = batch(7)
    args = (jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask))
    grads = {name: np.asarray(jax.grad(lambda lp, n=name: policy_loss(n, lp, args[0], *args[1:]))(args[0]))
             for name in ("cispo", "dapo", "ppo")}
    expected = -np.broadcast_to(adv[:, None], logp.shape) * mask / mask.sum()
    for name, g in grads.items():
        np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_grpo_averages_each_response_first():
    logp, old, adv, mask = batch(8, B=5, T=7)
    mask[2] = 0.0  # a response with no tokens is left out of the mean
    r = _np_ratio(logp, old)
    A = np.broadcast_to(adv[:, None], r.shape)
    surr = np.minimum(r * A, np.clip(r, 0.8, 1.2) * A)
    n = mask.sum(1)
    expected = -np.mean([(surr[i] * mask[i]).sum() / n[i] for i in range(5) if n[i] > 0])
    got = grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    tok = ppo_clip_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    assert abs(float(got) - float(tok)) > 1e-4  # the normalisations differ on uneven lengths


def test_losses_by_name_and_their_bounds():
    assert loss_bounds("cispo") == (None, 0.28) and loss_bounds("dapo") == (0.2, 0.28)
    assert loss_bounds("grpo") == (0.2, 0.2) and loss_bounds("ppo", eps_high=0.3) == (0.2, 0.3)
    logp, old, adv, mask = batch(9)
    a = tuple(jnp.asarray(x) for x in (logp, old, adv, mask))
    assert float(policy_loss("dapo", *a)) == float(ppo_clip_loss(*a, eps_low=0.2, eps_high=0.28))
    assert float(policy_loss("grpo", *a)) == float(grpo_loss(*a, eps_low=0.2, eps_high=0.2))
    # CISPO's lower bound is off by default: a ratio far below 1 keeps its (tiny) weight, not 1 - eps.
    r = _np_ratio(logp, old)
    w = np.minimum(r, 1.28)
    np.testing.assert_allclose(float(policy_loss("cispo", *a)), -np.sum(w * adv[:, None] * logp * mask) / mask.sum(),
                               rtol=1e-5)
    assert (r[mask > 0] < 0.5).any()
    with pytest.raises(ValueError, match="expected one of"):
        policy_loss("reinforce", *a)


def test_log_ratio_is_clipped_before_exp():
    logp = np.array([[-0.1, -0.2]], np.float32)
    old = np.array([[-40.1, -0.2]], np.float32)  # log-ratio 40 on the first token
    adv = np.array([-1.0], np.float32)
    mask = np.ones((1, 2), np.float32)
    got = float(ppo_clip_loss(*(jnp.asarray(x) for x in (logp, old, adv, mask))))
    expected = -(np.exp(20.0) * -1.0 + 1.0 * -1.0) / 2  # min(r A, clip(r) A) = r A for A < 0
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.isfinite(got)
    frac = float(clip_fraction(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask), eps_low=None, eps_high=0.2))
    assert frac == 0.5


def test_group_advantages_edge_cases():
    rewards = np.random.default_rng(10).normal(size=12).astype(np.float32)
    g = rewards.reshape(4, 3)
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, 3, scale=False)),
                               (g - g.mean(1, keepdims=True)).reshape(-1), rtol=1e-6, atol=1e-7)
    # A group whose rewards are all equal gets advantage 0 everywhere (scaled or not): no signal.
    same = np.array([1, 1, 1, 0, 1, 0], np.float32)
    np.testing.assert_array_equal(np.asarray(group_advantages(same, 3))[:3], 0.0)
    # group_size 1: nothing to compare with; scaling is impossible, centring gives zeros.
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1)
    np.testing.assert_array_equal(np.asarray(group_advantages(rewards, 1, scale=False)), 0.0)
    assert list(np.asarray(informative_groups(rewards, 1))) == [False] * 12
