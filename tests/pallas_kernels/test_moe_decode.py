"""The decode-step expert kernels (``pallas_kernels.moe.moe_decode``, Triton-lowered) in the Pallas
interpreter against a float64 per-pair loop: token and choice counts, feature sizes that are not powers of
two, bf16 and float32 weights; gradients through its VJP; they lower for CUDA to two kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import decode_triton, moe_decode


def loop64(x, w1, w3, w2, experts, weights):
    x, w1, w3, w2, weights = (np.asarray(a, np.float64) for a in (x, w1, w3, w2, weights))
    out = np.zeros(x.shape)
    for n in range(x.shape[0]):
        for j, e in enumerate(np.asarray(experts)[n]):
            g, u = x[n] @ w1[e], x[n] @ w3[e]
            out[n] += weights[n, j] * ((g / (1 + np.exp(-g)) * u) @ w2[e])
    return out


def _inputs(N, k, E, H, I, dtype, seed):
    kk = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(kk[0], (N, H)).astype(dtype)
    w1, w3 = ((0.2 * jax.random.normal(kk[i], (E, H, I))).astype(dtype) for i in (1, 2))
    w2 = (0.2 * jax.random.normal(kk[3], (E, I, H))).astype(dtype)
    experts = jax.random.randint(kk[4], (N, k), 0, E, jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(kk[5], (N, k)), axis=-1)
    return x, w1, w3, w2, experts, weights


@pytest.mark.parametrize("N, k, E, H, I, dtype", [
    (1, 2, 32, 128, 96, jnp.bfloat16),  # batch 1, top-2 of 32
    (4, 2, 16, 64, 40, jnp.float32),  # I = 40: tiles of 8
    (3, 3, 8, 192, 64, jnp.float32),  # odd k, H = 192 (tiles of 64)
    (8, 1, 16, 64, 256, jnp.bfloat16),
])
def test_kernels_match_the_float64_loop(N, k, E, H, I, dtype):
    args = _inputs(N, k, E, H, I, dtype, seed=N * 10 + k)
    ref = loop64(*args)
    y = decode_triton.decode_experts(*args, interpret=True)
    assert y.shape == (N, H) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(decode_triton.decode_experts_reference(*args), np.float64), ref,
                               rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_gradients_are_the_references():
    x, w1, w3, w2, experts, weights = _inputs(2, 2, 8, 64, 32, jnp.float32, seed=3)
    ct = jax.random.normal(jax.random.key(9), (2, 64))
    f = lambda fn: lambda *a: jnp.sum(fn(a[0], a[1], a[2], a[3], experts, a[4]) * ct)  # noqa: E731
    diff = (0, 1, 2, 3, 4)
    g = jax.grad(f(lambda *a: moe_decode(*a, True)), argnums=diff)(x, w1, w3, w2, weights)
    g0 = jax.grad(f(decode_triton.decode_experts_reference), argnums=diff)(x, w1, w3, w2, weights)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g[1]).max()) > 0  # the routed experts' gradients are there


def test_bad_shapes_name_what_is_wrong():
    x, w1, w3, w2, experts, weights = _inputs(2, 2, 8, 64, 32, jnp.float32, seed=1)
    with pytest.raises(ValueError, match="multiples of 8"):
        decode_triton.decode_experts(x[:, :60], w1[:, :60], w3[:, :60], w2[..., :60], experts, weights)
    with pytest.raises(ValueError, match="experts and weights"):
        decode_triton.decode_experts(x, w1, w3, w2, experts[:, :1], weights)
    with pytest.raises(ValueError, match="w1, w3"):
        decode_triton.decode_experts(x, w1, w3, w1, experts, weights)


def test_lowers_for_cuda_to_two_kernels_that_read_the_weights_in_place():
    S = jax.ShapeDtypeStruct
    N, k, E, H, I = 1, 2, 32, 1024, 384
    args = (S((N, H), jnp.bfloat16), S((E, H, I), jnp.bfloat16), S((E, H, I), jnp.bfloat16),
            S((E, I, H), jnp.bfloat16), S((N, k), jnp.int32), S((N, k), jnp.float32))
    text = jax.jit(decode_triton.decode_experts).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call") == 2
    assert "gather" not in text  # no copy of the routed experts' weights
