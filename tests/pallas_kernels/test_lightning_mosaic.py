"""The Mosaic GPU (Hopper) forward kernel in the Mosaic GPU interpreter on the CPU.

The interpreter (jax >= 0.10) runs the kernel's pipeline, TMA copies, SMEM buffers and wgmma calls;
its wgmma has no transposed operands, so the two transposed products run as plain dots there.
Shapes follow the kernel's requirements: bf16, chunk 64, head dims multiples of 64.
"""

import jax.numpy as jnp
import pytest

from pallas_kernels.lightning import gpu_mosaic
from test_lightning_kernels import assert_close, kernel_fn, make, reference_f32, value_and_grads

pytestmark = pytest.mark.skipif(not gpu_mosaic.interpret_supported(),
                                reason="this JAX has no Mosaic GPU interpreter")


@pytest.mark.parametrize("T,random_states", [(1, True), (63, False), (64, True), (3 * 64 + 5, True)])
def test_mosaic_forward_and_grads(T, random_states):
    x = make(1, 2, T, 64, jnp.bfloat16, seed=T, h0=random_states, dht=random_states)
    assert gpu_mosaic.supported(x["q"], x["v"], 64)
    got = value_and_grads(kernel_fn("pallas_gpu", "mosaic_gpu", 64), x)
    assert_close(got, reference_f32(x), 2e-2)


def test_mosaic_value_tiles_and_float32_fallback():
    x = make(1, 1, 70, 64, jnp.bfloat16, seed=1, Dv=128)  # two value tiles of 64
    got = value_and_grads(kernel_fn("pallas_gpu", "mosaic_gpu", 64), x)
    assert_close(got, reference_f32(x), 2e-2)
    x32 = make(1, 1, 20, 16, jnp.float32, seed=2)  # unsupported by Mosaic: the Triton kernel runs
    got = value_and_grads(kernel_fn("pallas_gpu", "mosaic_gpu", 16), x32)
    assert_close(got, reference_f32(x32), 2e-5)
