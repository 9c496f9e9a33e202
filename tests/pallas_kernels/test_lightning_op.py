"""The public op's dispatch, fallbacks and errors, and the decode step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.lightning import op as lop
from pallas_kernels.lightning import reference


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


def test_segment_ids_fall_back_to_reference():
    q, k, v, d, h0 = _x(T=12)
    seg = jnp.asarray([[0] * 5 + [1] * 7])
    want = reference.lightning_attention_chunked(q, k, v, d, h0, 4, seg)
    got = pallas_kernels.lightning_attention(q, k, v, d, initial_state=h0, backend="pallas_gpu", block_size=4,
                                             interpret=True, segment_ids=seg)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_input_errors_name_the_tensor():
    q, k, v, d, h0 = _x()
    with pytest.raises(ValueError, match="decay"):
        pallas_kernels.lightning_attention(q, k, v, d[:1])
    with pytest.raises(ValueError, match="initial_state"):
        pallas_kernels.lightning_attention(q, k, v, d, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match="state"):
        pallas_kernels.lightning_decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], d, h0[:, :1])


def test_decode_step_matches_reference_and_donates():
    q, k, v, d, h0 = _x()
    want = reference.lightning_decode_reference(q[:, :, 0], k[:, :, 0], v[:, :, 0], d, h0)
    state = jnp.array(h0)
    o, s = pallas_kernels.lightning_decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], d, state)
    np.testing.assert_allclose(o, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, want[1], rtol=1e-5, atol=1e-5)
    # Under an outer jit with a donated carry (the inference loop pattern).
    step = jax.jit(pallas_kernels.lightning_decode_step_nodonate, donate_argnums=(4,))
    o2, _ = step(q[:, :, 0], k[:, :, 0], v[:, :, 0], d, jnp.array(h0))
    np.testing.assert_allclose(o2, want[0], rtol=1e-5, atol=1e-5)


def test_decay_gets_zero_gradient_from_pallas():
    q, k, v, d, h0 = _x(T=9)
    g = jax.grad(lambda d: jnp.sum(lop.lightning_attention_kernel(q, k, v, d, backend="pallas_tpu", impl="tpu",
                                                                    block_size=8, interpret=True)[0]))(d)
    assert np.all(np.asarray(g) == 0)
