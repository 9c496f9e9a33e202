"""Grouped GEMM (pallas_kernels.moe) against a float64 NumPy loop over groups: values and both gradients,
every backend that runs on the CPU (XLA; the Mosaic GPU, Triton and megablox kernels interpreted), with
uneven and empty groups and rows past the groups. The compiled Hopper kernels are lowered for CUDA at
the model's shapes (Mosaic GPU verifies wgmma shapes and shared memory there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import gpu_mosaic, grouped_matmul, resolve_backend

# 5 groups over 130 rows: empty groups first, in the middle and last; 10 rows past the groups;
# boundaries inside tiles of 64 and 128
SIZES = np.array([0, 37, 0, 60, 23, 0], np.int32)
M, K, N = 130, 64, 64


def loop_reference(x, w, sizes, ct):
    """out = x_g @ w_g per group; d/dx and d/dw of sum(out * ct), float64."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    out = np.zeros((x.shape[0], w.shape[2]))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    start = 0
    for g, n in enumerate(sizes):
        rows = slice(start, start + n)
        out[rows] = x[rows] @ w[g]
        dx[rows] = ct[rows] @ w[g].T
        dw[g] = x[rows].T @ ct[rows]
        start += n
    return out, dx, dw


def _inputs(dtype):
    k = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(k[0], (M, K), jnp.float32).astype(dtype)
    w = (0.2 * jax.random.normal(k[1], (len(SIZES), K, N), jnp.float32)).astype(dtype)
    ct = jax.random.normal(k[2], (M, N), jnp.float32)
    return x, w, ct


@pytest.mark.parametrize("backend", ["xla", "mosaic_gpu", "triton", "megablox"])
def test_grouped_matmul_and_its_vjp_match_a_loop_over_groups(backend):
    if backend == "mosaic_gpu" and not gpu_mosaic.interpret_supported():
        pytest.skip("this JAX has no Mosaic GPU interpreter")
    x, w, ct = _inputs(jnp.float32)
    sizes = jnp.asarray(SIZES)
    interpret = backend != "xla"

    def f(x, w):
        out = grouped_matmul(x, w, sizes, backend=backend, interpret=interpret)
        return jnp.sum(out * ct), out

    (_, out), (dx, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
    ref, rdx, rdw = loop_reference(x, w, SIZES, ct)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out), ref, **tol)
    assert np.all(np.asarray(out)[SIZES.sum():] == 0)  # rows past the groups are zero
    np.testing.assert_allclose(np.asarray(dx), rdx, **tol)
    np.testing.assert_allclose(np.asarray(dw), rdw, **tol)
    assert np.all(np.asarray(dw)[SIZES == 0] == 0)  # empty groups get no gradient


def test_bf16_operands_with_float32_weights_give_float32_weight_gradients():
    x, w, ct = _inputs(jnp.bfloat16)
    w32 = w.astype(jnp.float32)
    sizes = jnp.asarray(SIZES)
    f = lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, backend="xla").astype(jnp.float32) * ct)  # noqa: E731
    dx, dw = jax.grad(f, argnums=(0, 1))(x, w32)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    ref, rdx, rdw = loop_reference(x, w, SIZES, ct.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(dw), rdw, rtol=2e-2, atol=2e-2 * np.abs(rdw).max())


def test_backend_choice_and_errors():
    if jax.default_backend() == "cpu":
        assert resolve_backend("gmm", "auto", 4096, 1024, 768, jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="backend = 'cuda'"):
        grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((2, 8, 8)), jnp.array([2, 2]), backend="cuda")
    with pytest.raises(ValueError, match="cannot take gmm with feature sizes K=96"):
        resolve_backend("gmm", "mosaic_gpu", 64, 96, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="disagree on K"):
        grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((2, 6, 8)), jnp.array([2, 2]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((2, 8, 8)), jnp.array([1, 1, 2]))


@pytest.mark.parametrize("k, n", [(1024, 384), (384, 1024)])
def test_hopper_kernels_lower_at_model_shapes(k, n):
    """Lowering for CUDA runs Mosaic GPU's verifier (wgmma tile shapes, shared memory per block)."""
    bf = jnp.bfloat16
    x = jax.ShapeDtypeStruct((32768, k), bf)
    w = jax.ShapeDtypeStruct((32, k, 2 * n if k > n else n), bf)
    gs = jax.ShapeDtypeStruct((32,), jnp.int32)
    dy = jax.ShapeDtypeStruct((32768, w.shape[2]), bf)

    def f(x, w, gs, dy):
        return jax.vjp(lambda x, w: grouped_matmul(x, w, gs, backend="mosaic_gpu"), x, w)[1](dy)

    text = jax.jit(f).trace(x, w, gs, dy).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3  # forward, input gradient and weight gradient kernels
