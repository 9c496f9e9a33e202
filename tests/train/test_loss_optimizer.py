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


def _numpy_ce(h, w, t, m):
    """Per-token (cross-entropy, logsumexp) in float64 NumPy."""
    logits = np.einsum("bth,hv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    mx = logits.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
    tgt = np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0]
    return lse - tgt, lse


def test_chunked_ce_metrics_and_bf16_head():
    h, w, t, m = _inputs()
    coef = 1e-3
    loss, met = chunked_cross_entropy(h, w, t, m, z_loss_coef=coef, chunk_size=32)
    ce, lse = _numpy_ce(h, w, t, m)
    mask = np.asarray(m, np.float64)
    ce_mean, z_mean = (ce * mask).sum() / mask.sum(), (lse ** 2 * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(met["ce"]), ce_mean, rtol=1e-5)
    np.testing.assert_allclose(float(met["z_loss"]), z_mean, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce_mean + coef * z_mean, rtol=1e-5)
    assert float(met["tokens"]) == float(mask.sum())
    # bf16 operands (float32 accumulation): the float64 CE of the bf16-rounded operands.
    hb = h.astype(jnp.bfloat16)
    lb, _ = chunked_cross_entropy(hb, w, t, m, head_dtype="bfloat16")
    ce_b, _ = _numpy_ce(hb.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32), t, m)
    np.testing.assert_allclose(float(lb), (ce_b * mask).sum() / mask.sum(), rtol=1e-5)
    assert abs(float(lb) - ce_mean) > 1e-6  # the bf16 rounding is visible: the check above is not vacuous
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
    # Clipping inside make_optimizer: a gradient of norm 50 is scaled to norm 1 before Adam. With a large
    # eps the first Adam step -lr * g / (|g| + eps) depends on the gradient's scale, so the clip shows.
    lr, eps, wd, clip = 0.1, 1.0, 0.1, 1.0
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=0, schedule="constant", eps=eps,
                                           weight_decay=wd, clip_norm=clip), 10)
    big = {"blocks": {"input_layernorm": {"weight": jnp.asarray([30.0, 0.0, 0.0])},
                      "mlp": {"w": jnp.full((3, 3), 0.0).at[0, 0].set(-40.0)}, "proj": {"bias": jnp.zeros(3)}}}
    for scale in (1.0, 0.01):  # norm 50 (clipped) and norm 0.5 (below the threshold: unchanged)
        g = jax.tree.map(lambda x: x * scale, big)
        upd, _ = tx.update(g, tx.init(params), params)
        gn = np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(g)))
        factor = min(1.0, clip / gn)
        for path in (("input_layernorm", "weight"), ("mlp", "w"), ("proj", "bias")):
            gc = np.asarray(g["blocks"][path[0]][path[1]], np.float64) * factor
            p = np.asarray(params["blocks"][path[0]][path[1]], np.float64)
            decay = wd * p if path[0] == "mlp" else 0.0
            expected = -lr * (gc / (np.abs(gc) + eps) + decay)
            np.testing.assert_allclose(np.asarray(upd["blocks"][path[0]][path[1]]), expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="OptimizerConfig.schedule"):
        make_optimizer(OptimizerConfig(schedule="linear"), 10)


def test_clipping_inside_the_real_train_step():
    """One real train step (m1_jax.train.step) with a clip far below the gradient norm: the parameters move by
    AdamW's first step on the clipped gradient, the gradient taken independently from the full float32 logits."""
    from flax import nnx

    from m1_jax import MiniMaxForCausalLM, ModelConfig
    from m1_jax.train import step as step_lib

    cfg = ModelConfig.preset("tiny", num_hidden_layers=2, layer_types=("linear_attention", "full_attention"),
                             block_size=8, moe_impl="dense")
    lr, eps, clip, wd = 1e-2, 1e-3, 1e-3, 0.1
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=0, schedule="constant", eps=eps,
                                               weight_decay=wd, clip_norm=clip), 10)
    graphdef, _ = step_lib.abstract_model(cfg, 0)
    state = jax.jit(lambda: step_lib.init_state(cfg, tx, 0))()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 17)).astype(np.int32)
    batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
             "segment_ids": jnp.ones((2, 16), jnp.int32), "loss_mask": jnp.asarray(rng.uniform(size=(2, 16)) > 0.2, jnp.float32)}
    step = step_lib.make_train_step(graphdef, tx, sched, aux_loss_coef=cfg.router_aux_loss_coef, z_loss_coef=0.0,
                                    loss_chunk_size=8, head_dtype="float32", use_segment_ids=False)
    params0 = jax.tree.map(np.asarray, state["params"])
    new, metrics = jax.jit(step)(state, batch)

    def reference_loss(params):
        logits, aux = nnx.merge(graphdef, params)(batch["inputs"], return_aux=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]) + cfg.router_aux_loss_coef * aux

    grads = jax.jit(jax.grad(reference_loss))(state["params"])
    flat_g = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    gnorm = np.sqrt(sum(float((g ** 2).sum()) for g in flat_g))
    np.testing.assert_allclose(float(metrics["grad_norm"]), gnorm, rtol=1e-4)  # reported before clipping
    assert gnorm > 100 * clip  # the clip is active
    decayed = jax.tree.leaves(decay_mask(state["params"]))
    for g, p0, p1, d in zip(flat_g, jax.tree.leaves(params0), jax.tree.leaves(new["params"]), decayed, strict=True):
        gc = g * clip / gnorm
        expected = -lr * (gc / (np.abs(gc) + eps) + (wd * np.asarray(p0, np.float64) if d else 0.0))
        np.testing.assert_allclose(np.asarray(p1, np.float64) - p0, expected, rtol=2e-3, atol=1e-7)
