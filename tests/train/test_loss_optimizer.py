"""Chunked cross-entropy (values, gradients, z-loss, bf16 head) and the optimizer pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m1_jax.train.loss import chunked_cross_entropy, reference_cross_entropy
from m1_jax.train.optimizer import OptimizerConfig, decay_mask, make_optimizer, make_schedule


def _inputs(B=2, T=37, H=16, V=301, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (B, T, H))
    w = jax.random.normal(k[1], (H, V)) * 0.3
    t = jax.random.randint(k[2], (B, T), 0, V)
    m = (jax.random.uniform(k[3], (B, T)) > 0.2).astype(jnp.float32)
    return h, w, t, m


@pytest.mark.parametrize("z", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [16, 74, 1000])
def test_chunked_ce_matches_reference(z, chunk):
    h, w, t, m = _inputs()
    f = lambda h, w: chunked_cross_entropy(h, w, t, m, z_loss_coef=z, chunk_size=chunk)[0]
    r = lambda h, w: reference_cross_entropy(jnp.einsum("bth,hv->btv", h, w, precision="highest"), t, m, z)
    np.testing.assert_allclose(f(h, w), r(h, w), rtol=1e-5)
    for a, b in zip(jax.jit(jax.grad(lambda h, w: 2.5 * f(h, w), (0, 1)))(h, w),
                    jax.grad(lambda h, w: 2.5 * r(h, w), (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_ce_metrics_and_bf16_head():
    h, w, t, m = _inputs()
    loss, met = chunked_cross_entropy(h, w, t, m, z_loss_coef=1e-3, chunk_size=32)
    np.testing.assert_allclose(loss, met["ce"] + 1e-3 * met["z_loss"], rtol=1e-6)
    assert float(met["tokens"]) == float(m.sum())
    lb, _ = chunked_cross_entropy(h.astype(jnp.bfloat16), w, t, m, head_dtype="bfloat16")
    np.testing.assert_allclose(lb, met["ce"], rtol=2e-2)
    with pytest.raises(ValueError, match="head_dtype"):
        chunked_cross_entropy(h, w, t, m, head_dtype="float16")


def test_chunked_ce_never_builds_full_logits():
    h, w, t, m = _inputs(B=4, T=64, V=1000)
    jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, chunk_size=32)[0], (0, 1)))(h, w)
    shapes = [v.aval.shape for eq in jaxpr.jaxpr.eqns for v in eq.outvars if hasattr(v.aval, "shape")]
    sub = [v.aval.shape for eq in jaxpr.jaxpr.eqns for j in eq.params.values() if hasattr(j, "jaxpr")
           for e in j.jaxpr.eqns for v in e.outvars]
    assert not any(int(np.prod(s)) >= 4 * 64 * 1000 for s in shapes + sub)


def test_schedules():
    cos = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(cos(0)) == 0.0 and abs(float(cos(5)) - 0.5) < 1e-6 and abs(float(cos(10)) - 1.0) < 1e-6
    assert abs(float(cos(60)) - 0.55) < 1e-3 and abs(float(cos(110)) - 0.1) < 1e-6
    wsd = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2,
                                        min_lr_ratio=0.0), 100)
    assert float(wsd(50)) == 1.0 and float(wsd(80)) == 1.0 and abs(float(wsd(90)) - 0.5) < 1e-6
    assert float(wsd(100)) == 0.0


def test_adamw_defaults_mask_and_clipping():
    cfg = OptimizerConfig()
    assert (cfg.b1, cfg.b2) == (0.9, 0.95)
    params = {"blocks": {"input_layernorm": {"weight": jnp.ones(3)}, "mlp": {"w": jnp.ones((3, 3))},
                         "proj": {"bias": jnp.ones(3)}}}
    mask = decay_mask(params)
    assert mask["blocks"]["mlp"]["w"] and not mask["blocks"]["input_layernorm"]["weight"]
    assert not mask["blocks"]["proj"]["bias"]
    # Zero gradients: only decayed weights move (lr 1 after warmup 0, wd 0.5 -> w * (1 - 0.5)).
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=1.0, warmup_steps=0, schedule="constant",
                                           weight_decay=0.5), 10)
    st = tx.init(params)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), st, params)
    new = optax.apply_updates(params, upd)
    np.testing.assert_allclose(new["blocks"]["mlp"]["w"], 0.5)
    np.testing.assert_allclose(new["blocks"]["input_layernorm"]["weight"], 1.0)
    # Clipping: a huge gradient gives the same first Adam step as a small one (direction only) but the
    # clip transform rescales to norm 1.
    clip = optax.clip_by_global_norm(1.0)
    g = {"a": jnp.full(4, 100.0)}
    out, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(optax.global_norm(out), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="OptimizerConfig.schedule"):
        make_optimizer(OptimizerConfig(schedule="linear"), 10)
