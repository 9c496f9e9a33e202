"""Pallas lightning-attention kernels in interpret mode on the CPU, against the scan recurrence and
``jax.vjp`` of the reference: outputs, final state and every gradient (q, k, v, initial state), with
zero and random initial states and final-state cotangents."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.lightning import op as lop
from pallas_kernels.lightning import reference

C = 16  # chunk used by the kernels here (small, for interpret-mode speed)
IMPLS = [("pallas_gpu", "triton_fused"), ("pallas_gpu", "triton_chunked"), ("pallas_tpu", "tpu")]
IDS = [impl for _, impl in IMPLS]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make(B, H, T, D, dtype, seed, *, h0=True, dht=True, Dv=None):
    Dv = Dv or D
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    n = lambda k, s: jax.random.normal(k, s, jnp.float32)
    x = dict(q=(0.5 * n(ks[0], (B, H, T, D))).astype(dtype), k=(0.5 * n(ks[1], (B, H, T, D))).astype(dtype),
             v=n(ks[2], (B, H, T, Dv)).astype(dtype), decay=jnp.asarray(np.geomspace(0.9, 1e-5, H), jnp.float32),
             h0=n(ks[3], (B, H, D, Dv)) if h0 else jnp.zeros((B, H, D, Dv), jnp.float32),
             do=n(ks[4], (B, H, T, Dv)).astype(dtype),
             dht=n(ks[5], (B, H, D, Dv)) if dht else jnp.zeros((B, H, D, Dv), jnp.float32))
    return x


def kernel_fn(backend, impl, block_size=C):
    return functools.partial(lop.lightning_attention_kernel, backend=backend, impl=impl, block_size=block_size,
                             interpret=True)


def value_and_grads(f, x):
    """Output, final state, and grads of <o, do> + <ht, dht> w.r.t. q, k, v, h0 (all float32)."""
    def fwd(q, k, v, h0):
        return f(q, k, v, x["decay"], initial_state=h0)

    (o, ht), vjp = jax.vjp(fwd, x["q"], x["k"], x["v"], x["h0"])
    grads = vjp((x["do"], x["dht"]))
    return [jnp.asarray(a, jnp.float32) for a in (o, ht, *grads)]


def reference_f32(x, segment_ids=None):
    f32 = {k: (v.astype(jnp.float32) if hasattr(v, "astype") else v) for k, v in x.items()}
    o, ht = reference.lightning_attention_recurrent(f32["q"], f32["k"], f32["v"], f32["decay"], f32["h0"],
                                                    segment_ids=segment_ids)
    chunked = lambda q, k, v, d, initial_state: reference.lightning_attention_chunked(
        q, k, v, d, initial_state, 32, segment_ids=segment_ids)
    _, _, *grads = value_and_grads(chunked, f32)
    return [o, ht, *grads]


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def assert_close(got, want, tol, names=("o", "final_state", "dq", "dk", "dv", "dh0")):
    errs = {n: rel(g, w) for n, g, w in zip(names, got, want)}
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T,random_states", [(1, True), (C - 1, True), (C, False), (3 * C + 5, True)],
                         ids=["T=1", "T=C-1", "T=C,zero-states", "T=3C+5"])
def test_matches_recurrence_and_reference_vjp(backend, impl, dtype, T, random_states):
    x = make(2, 3, T, 16, dtype, seed=T + 7 * random_states, h0=random_states, dht=random_states)
    got = jax.jit(lambda x: value_and_grads(kernel_fn(backend, impl), x))(x)
    assert_close(got, reference_f32(x), TOL[dtype])


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IDS)
def test_mixed_states_and_rectangular_heads(backend, impl):
    """h0 random with a zero final-state cotangent, Dk != Dv."""
    x = make(1, 2, 2 * C + 3, 16, jnp.float32, seed=100, h0=True, dht=False, Dv=32)
    got = jax.jit(lambda x: value_and_grads(kernel_fn(backend, impl), x))(x)
    assert_close(got, reference_f32(x), TOL[jnp.float32])


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IDS)
def test_chunk_size_invariance(backend, impl):
    x = make(1, 2, 40, 16, jnp.float32, seed=3)
    a = jax.jit(lambda x: value_and_grads(kernel_fn(backend, impl, 16), x))(x)
    b = jax.jit(lambda x: value_and_grads(kernel_fn(backend, impl, 32), x))(x)
    assert_close(a, b, 2e-5)


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IDS)
def test_prefill_in_two_parts_equals_one(backend, impl):
    x = make(1, 2, 37, 16, jnp.float32, seed=4)
    f = kernel_fn(backend, impl)
    o, ht = f(x["q"], x["k"], x["v"], x["decay"], initial_state=x["h0"])
    A = 21
    o1, s1 = f(x["q"][:, :, :A], x["k"][:, :, :A], x["v"][:, :, :A], x["decay"], initial_state=x["h0"])
    o2, s2 = f(x["q"][:, :, A:], x["k"][:, :, A:], x["v"][:, :, A:], x["decay"], initial_state=s1)
    assert rel(jnp.concatenate([o1, o2], axis=2), o) < 2e-5
    assert rel(s2, ht) < 2e-5


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IDS)
def test_prefill_then_decode_equals_prefill(backend, impl):
    x = make(2, 3, 30, 16, jnp.float32, seed=5)
    f = kernel_fn(backend, impl)
    o, ht = f(x["q"], x["k"], x["v"], x["decay"], initial_state=x["h0"])
    _, s = f(x["q"][:, :, :-1], x["k"][:, :, :-1], x["v"][:, :, :-1], x["decay"], initial_state=x["h0"])
    o_last, s_new = pallas_kernels.lightning_decode_step(x["q"][:, :, -1], x["k"][:, :, -1], x["v"][:, :, -1],
                                                          x["decay"], s)
    assert rel(o_last, o[:, :, -1]) < 2e-5
    assert rel(s_new, ht) < 2e-5


def test_public_op_pallas_backends_in_interpret_mode():
    x = make(1, 2, 20, 16, jnp.bfloat16, seed=6)
    want = reference_f32(x)[:2]
    for backend in ("pallas_gpu", "pallas_tpu"):
        o, ht = pallas_kernels.lightning_attention(x["q"], x["k"], x["v"], x["decay"], initial_state=x["h0"],
                                                   backend=backend, block_size=256, interpret=True)
        assert o.dtype == jnp.bfloat16 and ht.dtype == jnp.float32
        assert_close([o.astype(jnp.float32), ht], want, 2e-2, names=("o", "final_state"))


@pytest.mark.parametrize("T,block,fwd_block,mode", [(5 * C, C, C, "states"), (6 * C - 3, C, C, "states"),
                                                    (6 * C - 3, 2 * C, C, "states"), (6 * C - 3, C, C, "fused")])
def test_chunked_forward_with_split_state_pass(T, block, fwd_block, mode):
    """Segments of 2 chunks walked in parallel, joined in XLA (the prefill forward); also a forward
    chunk different from the backward's, and the segment-fused variant."""
    x = make(1, 2, T, 16, jnp.float32, seed=11)
    tuning = dict(BK=16, BV=16, fwd_BV_out=16, fwd_L=2, fwd_block_size=fwd_block, fwd_mode=mode, fwd_BV_fused=16)
    f = functools.partial(lop.lightning_attention_kernel, backend="pallas_gpu", impl="triton_chunked",
                          block_size=block, interpret=True, tuning=tuning)
    got = jax.jit(lambda x: value_and_grads(f, x))(x)
    assert_close(got, reference_f32(x), TOL[jnp.float32])


def test_gpu_kernels_pad_odd_head_dims():
    """Head dims that are not powers of two (Dk=24, Dv=40) are zero-padded for the GPU kernels."""
    x = make(1, 2, 2 * C + 1, 24, jnp.float32, seed=9, Dv=40)
    got = jax.jit(lambda x: value_and_grads(kernel_fn("pallas_gpu", "triton_fused"), x))(x)
    assert_close(got, reference_f32(x), TOL[jnp.float32])
