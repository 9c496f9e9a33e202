"""The MoE layer against per-expert loops: every single-device implementation (values in float64 NumPy,
gradients against an autodiffed per-expert loop written here), the decode path's weight reads, the
load-balancing loss against its formula, and a short training run on the old and the new MoE path."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import ModelConfig
from m1_jax.model import MoE, load_balancing_loss
from m1_jax.model.moe import RouterStats, layer as moe_layer, route
from m1_jax.model.moe.experts import fuse_gate_up

F32 = jnp.float32


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


def loop_jnp(x, gate, w1, w3, w2, top_k):
    """The same loop in jnp (differentiable): top-k from the probabilities, a masked dense pass per expert."""
    xf = x.reshape(-1, x.shape[-1])
    p = jax.nn.softmax(jnp.dot(xf, gate, precision="highest"), axis=-1)
    top = jnp.argsort(-jax.lax.stop_gradient(p), axis=-1)[:, :top_k]
    w = jnp.take_along_axis(p, top, axis=-1)
    w = w / jnp.sum(w, -1, keepdims=True)
    out = jnp.zeros_like(xf)
    for e in range(w1.shape[0]):
        coef = jnp.sum(jnp.where(top == e, w, 0.0), axis=-1)
        h = jax.nn.silu(jnp.dot(xf, w1[e], precision="highest")) * jnp.dot(xf, w3[e], precision="highest")
        out = out + coef[:, None] * jnp.dot(h, w2[e], precision="highest")
    return out.reshape(x.shape)


def assert_matches_loop(fn, x, gate, ws, k, key):
    """``fn(x, gate, w1, w3, w2)``: values against the float64 loop, gradients (x and the experts) against
    the autodiffed jnp loop, for a random output cotangent."""
    ref, _ = per_expert_loop(np.asarray(x), *(np.asarray(a, np.float64) for a in (gate, *ws)), k)
    y = np.asarray(jax.jit(fn)(x, gate, *ws), np.float64).reshape(ref.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    ct = jax.random.normal(key, x.shape)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 2, 3, 4)))(x, gate, *ws)
    g0 = jax.jit(jax.grad(lambda *a: jnp.sum(loop_jnp(*a, k) * ct), argnums=(0, 2, 3, 4)))(x, gate, *ws)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5 * float(jnp.abs(b).max()))


CASES = [("gmm", 4, 2), ("auto", 5, 3), ("ragged", 8, 2), ("dense", 4, 2), ("ep_capacity", 6, 1)]


@pytest.mark.parametrize("impl, experts, top_k", CASES)
def test_moe_matches_per_expert_loop(impl, experts, top_k):
    c = ModelConfig.preset("tiny", num_local_experts=experts, num_experts_per_tok=top_k, moe_impl=impl,
                           moe_capacity_factor=-1.0)
    moe = MoE(c, rngs=nnx.Rngs(experts * 10 + top_k))
    x = np.random.default_rng(experts).standard_normal((3, 11, c.hidden_size)).astype(np.float32)
    w = [np.asarray(p.value, np.float64) for p in (moe.gate, moe.w1, moe.w3, moe.w2)]
    ref, probs = per_expert_loop(x, *w, top_k)
    y, stats = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
    assert moe.gate.value.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.prob_per_expert), probs.mean(0), rtol=1e-5)
    assert np.allclose(np.asarray(stats.tokens_per_expert).sum(-1), 1.0)
    assert float(stats.dropped_fraction) == 0.0


@pytest.mark.parametrize("impl, tokens", [("gmm", (2, 9)), ("gmm", (1, 1)), ("ep_capacity", (2, 9))])
def test_moe_gradients_match_per_expert_loop(impl, tokens):
    """(1, 1) is a decode shape: 2 pairs for 8 experts, each pair through its gathered expert."""
    E, k = 8, 2
    c = ModelConfig.preset("tiny", num_local_experts=E, num_experts_per_tok=k, moe_impl=impl, moe_capacity_factor=-1.0)
    kk = jax.random.split(jax.random.key(3), 6)
    H, I = c.hidden_size, c.intermediate_size
    x = jax.random.normal(kk[0], tokens + (H,))
    gate = jax.random.normal(kk[1], (H, E))
    ws = [0.3 * jax.random.normal(kk[2], (E, H, I)), 0.3 * jax.random.normal(kk[3], (E, H, I)),
          0.3 * jax.random.normal(kk[4], (E, I, H))]
    ct = jax.random.normal(kk[5], x.shape)

    def f(fn, x, gate, *ws):
        return jnp.sum(fn(x, gate, *ws) * ct)

    impl_fn = lambda *a: moe_layer.moe_forward(*a, impl=impl, top_k=k, capacity_factor=-1.0)[0]  # noqa: E731
    g = jax.jit(jax.grad(lambda *a: f(impl_fn, *a), argnums=(0, 1, 2, 3, 4)))(x, gate, *ws)
    g0 = jax.jit(jax.grad(lambda *a: f(lambda *b: loop_jnp(*b, k), *a), argnums=(0, 1, 2, 3, 4)))(x, gate, *ws)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("products", ["batched", "fused", "fused_gathered"])
def test_decode_step_reads_only_the_routed_experts(products):
    E, k = 32, 2
    c = ModelConfig.preset("tiny", num_local_experts=E, num_experts_per_tok=k, moe_decode=products)
    assert moe_layer.is_decode_shape(1, k, E) and not moe_layer.is_decode_shape(64, k, E)
    moe = MoE(c, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 1, c.hidden_size))
    graph, state = nnx.split(moe)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x)[0])(state, x)
    weights = {id(v) for v in jaxpr.jaxpr.invars if v.aval.shape[:1] == (E,) and len(v.aval.shape) == 3}
    assert len(weights) == 3  # w1, w3, w2
    consumers = {e.primitive.name for e in jaxpr.jaxpr.eqns for v in e.invars if id(v) in weights}
    if products != "fused":
        assert consumers == {"gather"}, consumers  # the expert weights are only gathered (k of E rows), never read whole
    else:  # one call: the two kernels index the routed experts inside the stacked weights
        assert len(consumers) == 1 and "custom_vjp" in consumers.pop()
    w = [np.asarray(p.value, np.float64) for p in (moe.gate, moe.w1, moe.w3, moe.w2)]
    ref, _ = per_expert_loop(np.asarray(x), *w, k)
    y = jax.jit(lambda s, x: nnx.merge(graph, s)(x)[0])(state, x)
    np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("products", moe_layer.DECODE_PRODUCTS)
def test_decode_products_match_per_expert_loop(products):
    """Both decode-shape expert computations (one-row grouped GEMMs, batched matrix-vector products): values
    and gradients against the float64 per-expert loop, 3 tokens (6 pairs) over 16 experts."""
    E, k = 16, 2
    c = ModelConfig.preset("tiny", num_local_experts=E, num_experts_per_tok=k)
    assert moe_layer.is_decode_shape(3, k, E)
    kk = jax.random.split(jax.random.key(11), 6)
    H, I = c.hidden_size, c.intermediate_size
    x = jax.random.normal(kk[0], (3, 1, H))
    gate = jax.random.normal(kk[1], (H, E))
    ws = [0.3 * jax.random.normal(kk[2 + j], s) for j, s in enumerate([(E, H, I), (E, H, I), (E, I, H)])]
    fn = lambda *a: moe_layer.moe_forward(*a, impl="gmm", top_k=k, decode_products=products)[0]  # noqa: E731
    assert_matches_loop(fn, x, gate, ws, k, kk[5])
    with pytest.raises(ValueError, match="decode_products"):
        moe_layer.moe_forward(x, gate, *ws, impl="gmm", top_k=k, decode_products="loop")


@pytest.mark.parametrize("impl, tokens", [("gmm", (2, 9)), ("gmm", (3, 1)), ("dense", (2, 5)), ("ep_capacity", (2, 5))])
@pytest.mark.parametrize("fuse", [True, False])
def test_fused_and_separate_gate_up_products_match_per_expert_loop(impl, tokens, fuse):
    """Gate and up as one product over concatenated weights or as two: values and gradients against the
    per-expert loop, on the dropless, decode (3 tokens over 16 experts), dense and capacity paths."""
    E, k = 16, 2
    c = ModelConfig.preset("tiny", num_local_experts=E, num_experts_per_tok=k)
    kk = jax.random.split(jax.random.key(5), 6)
    H, I = c.hidden_size, c.intermediate_size
    x = jax.random.normal(kk[0], tokens + (H,))
    gate = jax.random.normal(kk[1], (H, E))
    ws = [0.3 * jax.random.normal(kk[2 + j], s) for j, s in enumerate([(E, H, I), (E, H, I), (E, I, H)])]
    fn = lambda *a: moe_layer.moe_forward(*a, impl=impl, top_k=k, capacity_factor=-1.0, fuse=fuse)[0]  # noqa: E731
    assert_matches_loop(fn, x, gate, ws, k, kk[5])


def _concatenated_expert_weights(jaxpr, shape) -> int:
    """Concatenations in ``jaxpr`` (nested jaxprs included) whose result has ``shape``."""
    n = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "concatenate" and tuple(e.outvars[0].aval.shape) == shape:
            n += 1
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            n += _concatenated_expert_weights(sub, shape)
    return n


@pytest.mark.parametrize("weights, tokens, fused", [
    ("bfloat16", 64, False),  # 16-bit weights, 4 rows per expert: the products only read weights, no copy
    ("float32", 64, True),  # float32 master weights: the cast writes a copy anyway, the concatenation rides on it
    ("bfloat16", 4096, True),  # 256 rows per expert: compute-bound, the wider fused product
])
def test_gate_up_fusion_follows_the_weight_copy_rule(weights, tokens, fused):
    E, k, H, I = 32, 2, 64, 96
    assert fuse_gate_up(weights, "bfloat16", tokens * k / E) == fused
    x = jnp.ones((1, tokens, H), jnp.bfloat16)
    gate = jnp.ones((H, E), F32)
    ws = [jax.ShapeDtypeStruct(s, jnp.dtype(weights)) for s in [(E, H, I), (E, H, I), (E, I, H)]]
    for impl in ("gmm", "dense"):
        jaxpr = jax.make_jaxpr(lambda x, g, *w: moe_layer.moe_forward(x, g, *w, impl=impl, top_k=k)[0])(x, gate, *ws)
        rows = tokens if impl == "dense" else tokens * k / E
        want = int(fuse_gate_up(weights, "bfloat16", rows))
        assert _concatenated_expert_weights(jaxpr.jaxpr, (E, H, 2 * I)) == want, impl


def test_load_balancing_loss_matches_its_formula_on_random_routings():
    """E * sum_e f_e P_e over the tokens of all layers together (transformers' load_balancing_loss_func):
    f_e = fraction of the (token, choice) pairs that chose e, summed over the k choices; P_e = mean
    router probability of e. Random (unbalanced) routings of 3 layers with different gates."""
    E, k, N, H, L = 6, 2, 40, 16, 3
    rng = np.random.default_rng(0)
    stats, f_all, p_all = [], [], []
    for layer in range(L):
        x = rng.standard_normal((N, H)).astype(np.float32)
        gate = (rng.standard_normal((H, E)) * (layer + 1)).astype(np.float32)
        stats.append(jax.jit(route, static_argnums=2)(jnp.asarray(x), jnp.asarray(gate), k)[2])
        logits = x.astype(np.float64) @ gate
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=1)[:, :k]
        f_all.append(np.stack([(top[:, j, None] == np.arange(E)).mean(0) for j in range(k)]))  # [k, E]
        p_all.append(p)
    f = np.mean(f_all, axis=0)  # all layers' tokens together
    P = np.concatenate(p_all).mean(0)
    expected = E * np.sum(f * P[None, :])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    got = float(load_balancing_loss(RouterStats(stacked.tokens_per_expert, stacked.prob_per_expert)))
    assert abs(expected - k) > 0.05  # a routing the loss can tell from uniform
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    one = float(load_balancing_loss(stats[2]))  # a single layer
    np.testing.assert_allclose(one, E * np.sum(f_all[2] * p_all[2].mean(0)[None, :]), rtol=1e-5)


def _old_moe_forward(x, gate, w1, w3, w2, *, top_k, **_):
    """The MoE as it was before the grouped-GEMM layer (commit d93a6a6, moe_impl="ragged"): argsort,
    jnp.take, lax.ragged_dot per projection, scatter back; differentiated by JAX."""
    B, T, H = x.shape
    xf = x.reshape(B * T, H)
    weights, experts, stats = route(xf, gate, top_k)
    N, k, E = xf.shape[0], top_k, w1.shape[0]
    flat_e = experts.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    xs = jnp.take(xf, order // k, axis=0)
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, sizes)) * jax.lax.ragged_dot(xs, w3, sizes)
    ys = jax.lax.ragged_dot(h, w2, sizes)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(N, k, H)
    y = jnp.einsum("nkh,nk->nh", y.astype(F32), weights).astype(x.dtype)
    return y.reshape(B, T, H), stats


def test_short_training_run_gives_the_same_loss_curve_on_the_old_and_new_moe(monkeypatch):
    """AdamW on a one-layer model (softmax attention + MoE), the same seed and batches: the loss curve of
    the new dropless MoE (moe_impl="gmm": counting sort, permutation VJPs, fused gate/up grouped GEMMs
    with their own VJP) equals that of the old one."""
    import optax

    from m1_jax import MiniMaxForCausalLM

    cfg = ModelConfig.preset("tiny", num_hidden_layers=1, layer_types=("full_attention",), moe_impl="gmm")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 25)), jnp.int32)
    tx = optax.adamw(1e-2)

    def losses():
        graph, params = nnx.split(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))

        def loss_fn(p):
            logits, aux = nnx.merge(graph, p)(ids[:, :-1], return_aux=True)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1).mean()
            return nll + 0.01 * aux

        @jax.jit
        def step(p, opt):
            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt, loss

        opt, out = tx.init(params), []
        for _ in range(5):  # the same batch: the loss has to fall
            params, opt, loss = step(params, opt)
            out.append(float(loss))
        return np.array(out)

    new = losses()
    monkeypatch.setattr(moe_layer, "moe_forward", _old_moe_forward)
    old = losses()
    assert new[-1] < new[0] - 0.1  # it trains
    np.testing.assert_allclose(new, old, rtol=1e-5)
