"""One forward for training and decoding: the model with a cache (prefill chunks, single tokens, left
padding) against the model without one, and the cache sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax import MiniMaxForCausalLM, ModelConfig
from m1_jax.config import FULL, LINEAR
from m1_jax.model.cache import Cache

CFG = dict(num_hidden_layers=4, layer_types=(LINEAR, FULL, LINEAR, LINEAR), block_size=4, vocab_size=61,
           moe_impl="dense")


@pytest.fixture(scope="module")
def model():
    return MiniMaxForCausalLM(ModelConfig.preset("tiny", **CFG), rngs=nnx.Rngs(2))


@nnx.jit
def cached_call(model, ids, cache):
    return model(ids, cache=cache)


def test_cached_chunks_and_tokens_equal_the_full_forward_with_left_padding(model):
    rng = np.random.default_rng(0)
    T, pad = 13, np.array([0, 5, 12])  # rows of 13, 8 and 1 real tokens
    ids = rng.integers(0, 61, (3, T)).astype(np.int32)
    ids[np.arange(T)[None, :] < pad[:, None]] = 0  # left padding
    cache = model.init_cache(3, 32, kv_start=pad)
    pieces = []
    for lo, hi in ((0, 6), (6, 11), (11, 12), (12, 13)):  # chunks, then single tokens
        logits, cache = cached_call(model, jnp.asarray(ids[:, lo:hi]), cache)
        pieces.append(np.asarray(logits))
    got = np.concatenate(pieces, axis=1)
    assert int(cache.length) == T
    for r in range(3):  # each row alone, without padding and without a cache
        alone = np.asarray(model(jnp.asarray(ids[r:r + 1, pad[r]:])))[0]
        np.testing.assert_allclose(got[r, pad[r]:], alone, rtol=2e-5, atol=2e-5)


def test_unscanned_blocks_and_return_aux_with_a_cache(model):
    c = model.config.replace(scan_layers=False)
    unscanned = nnx.merge(nnx.graphdef(MiniMaxForCausalLM(c, rngs=nnx.Rngs(0))), nnx.state(model))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 9)), jnp.int32)
    a, ca = cached_call(model, ids, model.init_cache(2, 16))
    b, aux, cb = nnx.jit(lambda m, ids, cache: m(ids, cache=cache, return_aux=True))(unscanned, ids,
                                                                                      unscanned.init_cache(2, 16))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ca.keys), np.asarray(cb.keys), rtol=1e-5, atol=1e-6)
    assert aux.shape == () and float(aux) > 0


def test_cache_errors(model):
    ids = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a cache"):
        model(ids, segment_ids=jnp.zeros((2, 3), jnp.int32), cache=model.init_cache(2, 8))
    with pytest.raises(ValueError, match="2 rows but the cache has 3"):
        model(ids, cache=model.init_cache(3, 8))
    with pytest.raises(ValueError, match="do not fit a cache of 2 slots"):
        model(ids, cache=model.init_cache(2, 2))
    with pytest.raises(ValueError, match="after 4 filled slots do not fit a cache of 6 slots"):
        model(ids, cache=model.init_cache(2, 6)._replace(length=jnp.int32(4)))
    with pytest.raises(ValueError, match=r"kv_start must be \[batch\] = \[2\]"):
        model.init_cache(2, 8, kv_start=[0, 1, 2])


def test_cache_layout_and_cache_bytes():
    c = ModelConfig.preset("tiny", **CFG)
    cache = MiniMaxForCausalLM(c, rngs=nnx.Rngs(0)).init_cache(3, 40, kv_dtype="bfloat16")
    assert isinstance(cache, Cache)
    assert cache.lightning.shape == (3, 3, c.num_attention_heads, c.head_dim, c.head_dim)
    assert cache.lightning.dtype == jnp.float32
    assert cache.keys.shape == (1, 3, c.num_key_value_heads, 40, c.head_dim) and cache.keys.dtype == jnp.bfloat16
    arrays = cache.lightning.nbytes + cache.keys.nbytes + cache.values.nbytes
    assert m1_jax.cache_bytes(c, 40, 3, kv_dtype="bfloat16") == arrays
    # m1-80k: 70 lightning layers of 64 x 128 x 128 float32, 10 softmax layers of 8 x 128 K and V in bf16
    m1 = ModelConfig.preset("m1-80k")
    per_row = 70 * 64 * 128 * 128 * 4
    per_token = 10 * 2 * 8 * 128 * 2
    assert m1_jax.cache_bytes(m1, 1 << 20, 2) == 2 * (per_row + (1 << 20) * per_token)
    twin = m1.replace(layer_types=(FULL,) * 80)
    assert m1_jax.cache_bytes(twin, 8192, 1, kv_dtype="float32") == 8192 * 80 * 2 * 8 * 128 * 4
    with pytest.raises(ValueError, match="context_len"):
        m1_jax.cache_bytes(m1, -1, 1)
