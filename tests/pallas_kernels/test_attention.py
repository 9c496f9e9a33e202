"""Softmax-attention kernels against float64 NumPy loops: attention over a KV cache (XLA blockwise and the
Pallas kernel in interpret mode) and packed-row flash attention (values and gradients)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import cache_attention, flash_attention


def cache_reference(q, kc, vc, layer, q_start, kv_start):
    """float64 loop: key slot s visible to query t of row b iff kv_start[b] <= s <= q_start[b] + t."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, kc[layer], vc[layer]))
    B, T, N, D = q.shape
    K, S = k.shape[1], k.shape[2]
    out = np.zeros((B, T, N, D))
    for b in range(B):
        for t in range(T):
            vis = (np.arange(S) >= kv_start[b]) & (np.arange(S) <= q_start[b] + t)
            if not vis.any():
                continue  # padding query: zeros
            for n in range(N):
                h = n // (N // K)
                s = k[b, h][vis] @ q[b, t, n] / math.sqrt(D)
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ v[b, h][vis]
    return out


def random_cache_case(rng, B, T, N, K, D, S, L=2):
    q = rng.standard_normal((B, T, N, D)).astype(np.float32)
    kc = rng.standard_normal((L, B, K, S, D)).astype(np.float32)
    vc = rng.standard_normal((L, B, K, S, D)).astype(np.float32)
    q_start = rng.integers(0, S - T + 1, B).astype(np.int32)
    kv_start = np.minimum(rng.integers(0, S, B), q_start + T - 1).astype(np.int32)
    kv_start[-1] = q_start[-1] + T // 2 + 1 if T > 1 else kv_start[-1]  # a row whose first queries see nothing
    return q, kc, vc, q_start, kv_start


@pytest.mark.parametrize("B, T, N, K, D, S, block_k", [
    (3, 1, 4, 2, 16, 96, 32),  # decode; S a multiple of the block
    (2, 7, 6, 3, 8, 50, 16),  # a chunk; S not a multiple of the block; GQA 2
    (1, 5, 2, 2, 16, 33, 512),  # one block bigger than S
])
def test_cache_attention_xla_matches_float64(B, T, N, K, D, S, block_k):
    rng = np.random.default_rng(B * 100 + T)
    q, kc, vc, q_start, kv_start = random_cache_case(rng, B, T, N, K, D, S)
    f = jax.jit(lambda q, kc, vc, qs, ks: cache_attention(q, kc, vc, q_start=qs, kv_start=ks, layer=1, backend="xla",
                                                          block_k=block_k))
    got = f(q, kc, vc, q_start, kv_start)
    ref = cache_reference(q, kc, vc, 1, q_start, kv_start)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5)


def test_cache_attention_pallas_interpret_matches_float64_and_splits():
    rng = np.random.default_rng(7)
    q, kc, vc, q_start, kv_start = random_cache_case(rng, 3, 5, 4, 2, 16, 128)
    ref = cache_reference(q, kc, vc, 0, q_start, kv_start)
    for splits in (1, 3):  # one program per row block, and split-K (flash decoding) merged in XLA
        got = cache_attention(q, kc, vc, q_start=q_start, kv_start=kv_start, layer=0, backend="pallas_gpu",
                              interpret=True, block_k=16, num_splits=splits)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5)
    # an unstacked [B, K, S, D] cache and a scalar q_start
    got = cache_attention(q[:, :1], kc[0], vc[0], q_start=int(q_start.max()), kv_start=np.zeros(3, np.int32),
                          backend="xla")
    ref = cache_reference(q[:, :1], kc, vc, 0, np.full(3, q_start.max()), np.zeros(3, np.int32))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5)


def test_cache_attention_bfloat16_stays_close():
    rng = np.random.default_rng(8)
    q, kc, vc, q_start, kv_start = random_cache_case(rng, 2, 3, 4, 2, 16, 64)
    ref = cache_reference(q, kc, vc, 1, q_start, kv_start)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    got = cache_attention(bf(q), bf(kc), bf(vc), q_start=q_start, kv_start=kv_start, layer=1, backend="xla")
    assert got.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(got, np.float32) - ref)) < 3e-2 * np.max(np.abs(ref))


def test_cache_attention_rejects_bad_inputs():
    q = jnp.zeros((2, 1, 4, 16))
    kc = jnp.zeros((2, 2, 64, 16))
    with pytest.raises(ValueError, match="backend='cuda'"):
        cache_attention(q, kc, kc, q_start=0, kv_start=jnp.zeros(2, jnp.int32), backend="cuda")
    with pytest.raises(ValueError, match=r"kv_start must be \[B\] = \[2\]"):
        cache_attention(q, kc, kc, q_start=0, kv_start=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="does not fit q"):
        cache_attention(jnp.zeros((2, 1, 3, 16)), kc, kc, q_start=0, kv_start=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="needs layer="):
        cache_attention(q, kc[None], kc[None], q_start=0, kv_start=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        cache_attention(jnp.zeros((2, 1, 4, 12)), jnp.zeros((2, 2, 64, 12)), jnp.zeros((2, 2, 64, 12)), q_start=0,
                        kv_start=jnp.zeros(2, jnp.int32), backend="pallas_gpu", interpret=True)


# ------------------------------------------------------------------------------------- packed rows
def dense_packed_reference(q, k, v, seg):
    """float32 dense masked attention (the independent reference the flash path replaces)."""
    N, K = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    T = q.shape[1]
    mask = (seg[:, :, None] == seg[:, None, :]) & (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])
    s = jnp.einsum("btnd,bsnd->bnts", q, k, precision="highest") / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", p, v, precision="highest")


def packed_case(rng, B, T, N, K, D):
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, T, N, D), (B, T, K, D), (B, T, K, D)))
    seg = np.zeros((B, T), np.int32)
    for b in range(B):  # documents of random lengths, boundaries anywhere (also inside key blocks)
        for cut in np.sort(rng.choice(np.arange(1, T), size=b + 1, replace=False)):
            seg[b, cut:] += 1
    return q, k, v, jnp.asarray(seg), jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.float32)


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu"])
def test_packed_flash_values_and_gradients_match_dense_mask(backend):
    rng = np.random.default_rng(11)
    q, k, v, seg, w = packed_case(rng, 2, 37, 4, 2, 16)
    kw = dict(interpret=True) if backend == "pallas_gpu" else {}

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    flash = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, backend=backend, **kw)  # noqa: E731
    dense = lambda q, k, v: dense_packed_reference(q, k, v, seg)  # noqa: E731
    run = jax.jit if backend == "xla" else (lambda f: f)
    o = run(flash)(q, k, v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(dense(q, k, v)), rtol=2e-5, atol=2e-5)
    got = run(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=5e-5, atol=5e-5)


def test_packed_flash_small_key_blocks_match_dense_mask():
    from pallas_kernels.attention import flash_attention_xla

    rng = np.random.default_rng(12)
    q, k, v, seg, w = packed_case(rng, 2, 21, 6, 3, 8)
    f = jax.jit(lambda q, k, v: flash_attention_xla(q, k, v, seg, sm_scale=1 / math.sqrt(8), block_k=4))
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(dense_packed_reference(q, k, v, seg)),
                               rtol=2e-5, atol=2e-5)
    g = jax.jit(jax.grad(lambda k: jnp.sum(f(q, k, v) * w)))(k)
    r = jax.grad(lambda k: jnp.sum(dense_packed_reference(q, k, v, seg) * w))(k)
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=5e-5, atol=5e-5)


# ------------------------------------------------------------------------------------- queries at an offset
def offset_reference(q, k, v, qseg, kseg, q_offset, causal):
    """float64 loop: query t (position q_offset + t) sees key s iff same document and (causal) s <= q_offset + t."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros((B, T, N, D))
    for b in range(B):
        for t in range(T):
            vis = kseg[b] == qseg[b, t]
            if causal:
                vis = vis & (np.arange(S) <= q_offset + t)
            if not vis.any():
                continue
            for n in range(N):
                h = n // (N // K)
                s = k[b, :, h][vis] @ q[b, t, n] / math.sqrt(D)
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ v[b, :, h][vis]
    return out


def dense_offset_reference(q, k, v, qseg, kseg, q_offset, causal):
    N, K = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    T, S = q.shape[1], k.shape[1]
    mask = qseg[:, :, None] == kseg[:, None, :]
    if causal:
        mask = mask & (jnp.arange(S)[None, None, :] <= q_offset + jnp.arange(T)[None, :, None])
    s = jnp.einsum("btnd,bsnd->bnts", q, k, precision="highest") / math.sqrt(q.shape[-1])
    s = jnp.where(mask[:, None], s, -1e30)
    p = jnp.where(mask[:, None], jax.nn.softmax(s, axis=-1), 0.0)
    return jnp.einsum("bnts,bsnd->btnd", p, v, precision="highest")


def test_flash_attention_at_an_offset_matches_float64():
    """A context shard's queries over the gathered keys: T = 21 queries at positions 40..60 of S = 75 keys,
    documents crossing the shard edge, tiles that divide neither length, q_offset traced under jit; causal
    with gradients, and the non-causal values."""
    rng = np.random.default_rng(13)
    B, T, S, N, K, D, off = 2, 21, 75, 4, 2, 8, 40
    q = rng.standard_normal((B, T, N, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, K, D)).astype(np.float32) for _ in range(2))
    kseg = np.zeros((B, S), np.int32)
    kseg[0, 30:] = 1
    kseg[0, 52:] = 2  # a document starting inside the shard
    kseg[1, 10:] = 5  # one document over the whole shard and before it
    qseg = kseg[:, off:off + T].copy()
    qseg[1, -3:] = 9  # queries of a document that has no key: zeros, zero gradients
    w = rng.standard_normal((B, T, N, D)).astype(np.float32)

    def f(q, k, v, o, causal=True):
        return flash_attention(q, k, v, segment_ids=qseg, kv_segment_ids=kseg, q_offset=o, causal=causal,
                               block_q=8, block_k=16)

    for causal in (True, False):
        got = jax.jit(f, static_argnums=4)(q, k, v, jnp.int32(off), causal)
        np.testing.assert_allclose(np.asarray(got), offset_reference(q, k, v, qseg, kseg, off, causal), rtol=2e-5,
                                   atol=2e-5)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
    g = jax.jit(jax.grad(loss(lambda q, k, v: f(q, k, v, jnp.int32(off))), argnums=(0, 1, 2)))(q, k, v)
    r = jax.jit(jax.grad(loss(lambda q, k, v: dense_offset_reference(q, k, v, qseg, kseg, off, True)),
                         argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, r):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-5, atol=5e-5)
    assert np.all(np.asarray(g[0])[1, -3:] == 0)


def test_flash_attention_offset_form_rejects_bad_inputs():
    q, k = jnp.ones((1, 4, 2, 16)), jnp.ones((1, 12, 2, 16))
    seg = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="need kv_segment_ids"):
        flash_attention(q, k, k, segment_ids=seg, q_offset=8)
    with pytest.raises(ValueError, match=r"kv_segment_ids must be \[B, S\] = \(1, 12\)"):
        flash_attention(q, k, k, segment_ids=seg, kv_segment_ids=jnp.zeros((1, 4), jnp.int32), q_offset=8)
    with pytest.raises(ValueError, match="'pallas_gpu' is self-attention only"):
        flash_attention(q, k, k, q_offset=8, backend="pallas_gpu", interpret=True)
    with pytest.raises(ValueError, match="block_q = 0"):
        flash_attention(q, k, k, q_offset=8, block_q=0)
