"""The Hopper kernels are lowered once per configuration in a program, not once per layer: a model's
identical layers call one jitted kernel function, so its module holds one copy of each Mosaic GPU kernel.
Lowering for CUDA runs on any machine; the Hopper kernel choice is forced (what an H100/H200 compiles).
Before this, the `small` train step lowered 90 kernel copies in 54 s (scripts/lowering_time.py)."""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels.lightning.op as lightning_op
from pallas_kernels.lightning import lightning_attention
from pallas_kernels.moe import grouped_matmul

BF16 = jnp.bfloat16


def _kernels(f, *args) -> int:
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("stablehlo.custom_call")


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(lightning_op, "is_hopper", lambda *a, **k: True)


def test_identical_lightning_layers_share_their_kernels(hopper):
    q = jax.ShapeDtypeStruct((1, 2, 512, 64), BF16)
    d = jax.ShapeDtypeStruct((2,), jnp.float32)

    def layers(n):
        def f(x, k, v, decay):
            for _ in range(n):
                x = lightning_attention(x, k, v, decay, backend="pallas_gpu")[0]
            return jnp.sum(x.astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))  # forward and every backward walk

    two, six = _kernels(layers(2), q, q, q, d), _kernels(layers(6), q, q, q, d)
    assert two >= 3  # the forward walk and the backward walks are there
    assert six == two  # (one copy per kernel configuration; without sharing six layers hold three times as many)


def test_identical_moe_layers_share_their_grouped_gemms():
    x = jax.ShapeDtypeStruct((512, 128), BF16)
    w = jax.ShapeDtypeStruct((4, 128, 128), BF16)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

    def layers(n):
        def f(x, w, sizes):
            for _ in range(n):
                x = grouped_matmul(x, w, sizes, backend="mosaic_gpu")
            return jnp.sum(x.astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1))  # gmm, its transposed gmm and the weight-gradient tgmm

    two, six = _kernels(layers(2), x, w, sizes), _kernels(layers(6), x, w, sizes)
    assert two >= 3
    assert six == two


def test_wide_walks_lower_for_cuda(hopper, monkeypatch):
    """The compiled path of the wide walks (wgmma, register layouts, aliased buffers), which the interpreter
    does not run, lowers for CUDA: forward and backward at MiniMax's head dims with two segments and packed
    rows (output, state-only and reverse walks, document bounds in the stages)."""
    from pallas_kernels.lightning import gpu_mosaic_wide as wide
    from pallas_kernels.lightning import lightning_attention_kernel
    calls = []
    real = wide.wide_walk
    monkeypatch.setattr(wide, "wide_walk", lambda *a, **k: calls.append(k["with_out"]) or real(*a, **k))
    q = jax.ShapeDtypeStruct((1, 2, 520, 128), BF16)
    h0 = jax.ShapeDtypeStruct((1, 2, 128, 128), jnp.float32)
    d = jax.ShapeDtypeStruct((2,), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 520), jnp.int32)

    def f(q, k, v, decay, h0, ids):
        def loss(q, k, v, h0):
            o, ht = lightning_attention_kernel(q, k, v, decay, initial_state=h0, impl="mosaic_gpu", segment_ids=ids,
                                               tuning={"wide": "always", "segments": 2})
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, h0)

    assert _kernels(f, q, q, q, d, h0, ids) >= 5
    assert True in calls and False in calls  # output walks and state-only walks
