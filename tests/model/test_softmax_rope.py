"""Partial rotary (rotary_dim = head_dim / 2, as in the released checkpoints) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import ModelConfig
from m1_jax.model import SoftmaxAttention


def numpy_softmax_attention(x, wq, wk, wv, wo, positions, rotary_dim, theta, segment_ids=None):
    """The original remote code's flash-attention path, written out in float64."""
    x = x.astype(np.float64)
    B, T, _ = x.shape
    q = np.einsum("bth,hnd->btnd", x, wq)
    k = np.einsum("bth,hnd->btnd", x, wk)
    v = np.einsum("bth,hnd->btnd", x, wv)
    n, kv, d = q.shape[2], k.shape[2], q.shape[3]
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    ang = positions[..., None].astype(np.float64) * inv_freq
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(t):
        r, rest = t[..., :rotary_dim], t[..., rotary_dim:]
        half = rotary_dim // 2
        rot = np.concatenate([-r[..., half:], r[..., :half]], -1)
        return np.concatenate([r * cos[:, :, None] + rot * sin[:, :, None], rest], -1)

    q, k = rope(q), rope(k)
    k = np.repeat(k, n // kv, axis=2)  # q head i uses kv head i // group
    v = np.repeat(v, n // kv, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
    allowed = np.tril(np.ones((T, T), bool))[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnd->btnd", p, v)
    return np.einsum("btnd,ndh->bth", o, wo)


@pytest.mark.parametrize("heads, kv, rotary_dim", [(4, 2, 8), (8, 2, 16), (4, 4, 0), (4, 1, 16)])
def test_partial_rotary_softmax_layer_matches_float64(heads, kv, rotary_dim):
    c = ModelConfig.preset("tiny", num_attention_heads=heads, num_key_value_heads=kv, head_dim=16,
                           rotary_dim=rotary_dim, rope_theta=10_000_000.0)
    layer = SoftmaxAttention(c, rngs=nnx.Rngs(heads + kv))
    rng = np.random.default_rng(rotary_dim)
    x = rng.standard_normal((2, 29, c.hidden_size)).astype(np.float32)
    positions = np.stack([np.arange(29), np.arange(1000, 1029)]).astype(np.int32)  # includes large offsets
    w = [np.asarray(p.value, np.float64) for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj)]
    ref = numpy_softmax_attention(x, *w, positions, rotary_dim, c.rope_theta)
    out = np.asarray(layer(jnp.asarray(x), jnp.asarray(positions)), np.float64)
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-5


def test_partial_rotary_differs_from_full_rotary():
    # Guards against a rotary_dim that is silently ignored (the transformers MiniMax bug).
    c = ModelConfig.preset("tiny", rotary_dim=8, rope_theta=100.0)
    layer = SoftmaxAttention(c, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, c.hidden_size)), jnp.float32)
    pos = jnp.arange(12)[None]
    half = layer(x, pos)
    full = SoftmaxAttention(c.replace(rotary_dim=16), rngs=nnx.Rngs(0))(x, pos)  # same weights
    assert float(jnp.max(jnp.abs(half - full))) > 1e-3 * float(jnp.max(jnp.abs(half)))


def test_segment_mask_keeps_attention_inside_documents():
    c = ModelConfig.preset("tiny")
    layer = SoftmaxAttention(c, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 20, c.hidden_size)).astype(np.float32)
    seg = np.repeat([0, 1], [12, 8])[None].astype(np.int32)
    pos = np.concatenate([np.arange(12), np.arange(8)])[None].astype(np.int32)
    w = [np.asarray(p.value, np.float64) for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj)]
    ref = numpy_softmax_attention(x, *w, pos, c.rotary_dim, c.rope_theta, segment_ids=seg)
    out = np.asarray(layer(jnp.asarray(x), jnp.asarray(pos), segment_ids=jnp.asarray(seg)), np.float64)
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-5


def test_cudnn_padding_of_the_sequence_is_exact():
    """The cuDNN path pads T to a multiple of 128 at the end; checked here with the XLA attention:
    outputs and gradients equal the unpadded call."""
    from m1_jax.model.softmax_attention import padded_causal
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(ks[0], (2, 37, 4, 16))
    k, v = jax.random.normal(ks[1], (2, 37, 2, 16)), jax.random.normal(ks[2], (2, 37, 2, 16))
    w = jax.random.normal(ks[3], (2, 37, 4, 16))
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    padded = lambda q, k, v: padded_causal(attend, q, k, v, 32)
    np.testing.assert_allclose(padded(q, k, v), attend(q, k, v), rtol=1e-5, atol=1e-5)
    for g_pad, g in zip(jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v),
                        jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_pad, g, rtol=1e-5, atol=1e-5)
