"""The public op's dispatch, fallbacks and errors, and the decode step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.lightning import op as lop
from pallas_kernels.lightning import vjp
from test_lightning_numpy_reference import recurrence_f64


def _x(B=1, H=2, T=10, D=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(kk, (B, H, T, D)) for kk in ks[:3])
    return q, k, v, jnp.asarray([0.5, 1e-3], jnp.float32)[:H], jax.random.normal(ks[3], (B, H, D, D))


def test_auto_is_reference_on_cpu():
    if jax.default_backend() == "cpu":
        assert lop.resolve_backend("auto") == "reference"
    with pytest.raises(ValueError, match="backend"):
        lop.resolve_backend("cuda")


def test_gpu_strategy_choice():
    assert lop.choose_kernel("pallas_gpu", (4, 16, 4096, 128), 128, jnp.bfloat16).impl == "triton_fused"
    assert lop.choose_kernel("pallas_gpu", (1, 8, 32768, 128), 128, jnp.bfloat16).impl == "triton_chunked"
    assert lop.choose_kernel("pallas_tpu", (1, 8, 4096, 128), 128, jnp.bfloat16).impl == "tpu"
    with pytest.raises(ValueError, match="power-of-two"):
        lop.choose_kernel("pallas_gpu", (1, 1, 64, 16), 16, jnp.float32, block_size=48)


def test_segment_ids_fall_back_to_reference(monkeypatch):
    """Packed rows on a kernel that cannot take them (the Triton kernels, chosen off Hopper) run on the
    reference: outputs, final state and gradients against a float64 NumPy recurrence that restarts
    the state at each document start; no Pallas kernel is called."""
    calls = []
    real = vjp.lightning_pallas
    monkeypatch.setattr(vjp, "lightning_pallas", lambda *a, **kw: calls.append(a[5].impl) or real(*a, **kw))
    q, k, v, d, h0 = _x(T=12)
    seg = jnp.asarray([[0] * 5 + [1] * 6 + [2]])  # a start inside a block, and a one-token document last
    do, dht = jax.random.normal(jax.random.PRNGKey(5), v.shape), jax.random.normal(jax.random.PRNGKey(6), h0.shape)

    def f(q, k, v, h0):
        return pallas_kernels.lightning_attention(q, k, v, d, initial_state=h0, backend="pallas_gpu", block_size=4,
                                                  interpret=True, segment_ids=seg)
    def value_and_grads(q, k, v, h0):
        (o, ht), pull = jax.vjp(f, q, k, v, h0)
        return [o, ht, *pull((do, dht))]
    got = jax.jit(value_and_grads)(q, k, v, h0)
    want = recurrence_f64(q, k, v, d, h0, seg, do, dht)
    for name, g, w in zip(("o", "final state", "dq", "dk", "dv", "dh0"), got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5, err_msg=name)
    assert calls == []


def test_float32_on_a_gpu_takes_the_reference(monkeypatch):
    """Compiled float32 calls of the GPU backend run on the XLA reference (true float32 products): on the
    CPU too, where no Pallas kernel is called, and against the float64 recurrence."""
    calls = []
    real = vjp.lightning_pallas
    monkeypatch.setattr(vjp, "lightning_pallas", lambda *a, **kw: calls.append(a[5].impl) or real(*a, **kw))
    q, k, v, d, h0 = _x(T=11)
    o, ht = jax.jit(lambda q, k, v, h0: pallas_kernels.lightning_attention(q, k, v, d, initial_state=h0,
                                                                           backend="pallas_gpu"))(q, k, v, h0)
    want_o, want_s = recurrence_f64(q, k, v, d, h0)
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ht), want_s, rtol=1e-5, atol=1e-5)
    assert calls == []
    assert lop.float32_on_reference("pallas_gpu", jnp.float32) and not lop.float32_on_reference("pallas_gpu",
                                                                                                  jnp.bfloat16)
    assert not lop.float32_on_reference("pallas_gpu", jnp.float32, interpret=True)


def test_triton_float32_precision_names():
    from jax import lax
    from pallas_kernels.lightning import triton_common as tc
    assert tc.precision(jnp.bfloat16, "tf32x3") is None
    assert tc.precision(jnp.float32, "ieee") == lax.Precision.HIGHEST
    assert tc.precision(jnp.float32, "tf32x3") == lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    assert tc.precision(jnp.float32, "tf32x3", interpret=True) == lax.Precision.HIGHEST
    with pytest.raises(ValueError, match="f32_precision"):
        tc.precision(jnp.float32, "tf32")


def test_input_errors_name_the_tensor():
    q, k, v, d, h0 = _x()
    with pytest.raises(ValueError, match="decay"):
        pallas_kernels.lightning_attention(q, k, v, d[:1])
    with pytest.raises(ValueError, match="initial_state"):
        pallas_kernels.lightning_attention(q, k, v, d, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match="state"):
        pallas_kernels.lightning_decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], d, h0[:, :1])


def test_decode_step_matches_reference_and_donates():
    """Token by token from a random state (Dk != Dv) against the float64 recurrence; the state passed in
    is donated (deleted after the call), also through lightning_decode_step_nodonate under a jit that
    donates it."""
    B, H, T, Dk, Dv = 2, 3, 3, 8, 6
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k = (jax.random.normal(kk, (B, H, T, Dk)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, H, T, Dv))
    h0 = jax.random.normal(ks[3], (B, H, Dk, Dv))
    d = jnp.asarray([0.9, 0.1, 1e-4], jnp.float32)
    want_o, want_s = recurrence_f64(q, k, v, d, h0)
    jit_step = jax.jit(pallas_kernels.lightning_decode_step_nodonate, donate_argnums=(4,))
    for step in (pallas_kernels.lightning_decode_step, jit_step):
        state = jnp.array(h0)
        for t in range(T):
            prev = state
            o, state = step(q[:, :, t], k[:, :, t], v[:, :, t], d, state)
            assert prev.is_deleted(), "the state passed in must be donated"
            assert o.shape == (B, H, Dv) and state.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(o), want_o[:, :, t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state), want_s, rtol=1e-5, atol=1e-5)


def test_decay_gets_zero_gradient_from_pallas():
    q, k, v, d, h0 = _x(T=9)
    g = jax.grad(lambda d: jnp.sum(lop.lightning_attention_kernel(q, k, v, d, backend="pallas_tpu", impl="tpu",
                                                                    block_size=8, interpret=True)[0]))(d)
    assert np.all(np.asarray(g) == 0)
