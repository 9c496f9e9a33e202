"""Cache attention as a Pallas kernel with the Triton lowering (any NVIDIA GPU; interpret mode on CPU).

One kernel serves chunked prefill (many queries per row) and decoding (one query per row):

* GQA rows: the ``G = N / K`` query heads that share a KV head are packed with the query tokens into
  the rows of one tile, row ``r = t * G + g``, so each K/V block is loaded once for all of them.
* Split-K (flash decoding): the key axis is cut into ``num_splits`` ranges, one program each; every
  program writes its float32 partial output with its running max and sum, and the partials are merged in
  XLA. Decoding at batch 1 has only ``B * K`` (row block, KV head) pairs, so the splits are what fill
  the GPU.
* Masks: key slot ``s`` is visible to query ``t`` of row ``b`` iff ``kv_start[b] <= s <= q_start[b] + t``
  (left padding, chunking and decoding alike). A program loops only over the key blocks inside that
  range, so the causal triangle and the padding cost nothing.
* The cache is the model's stacked buffer ``[L, B, K, S, D]``; the layer index is read inside the kernel,
  so no per-layer slice of the cache is ever copied.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def _kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, G, T, S, BQ, BK, split_len, scale, precision):
    rb, b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    q_start, kv_start, layer = meta_ref[0], meta_ref[1], meta_ref[2]
    rows = rb * BQ + jnp.arange(BQ)
    q_slot = q_start + rows // G  # [BQ]
    t_last = jnp.minimum((rb * BQ + BQ - 1) // G, T - 1)
    lo = jnp.maximum(kv_start, sp * split_len)
    hi = jnp.minimum(jnp.minimum(q_start + t_last + 1, (sp + 1) * split_len), S)
    q = q_ref[...]

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * BK, BK)
        k = k_ref[layer, b, h, pl.ds(start, BK), :]
        s = pltriton.dot(q, k, trans_b=True, precision=precision) * scale  # [BQ, BK], log2 domain
        slot = start + jnp.arange(BK)
        vis = (slot[None, :] >= kv_start) & (slot[None, :] <= q_slot[:, None])
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * corr + jnp.sum(p, axis=1)
        v = v_ref[layer, b, h, pl.ds(start, BK), :]
        acc = acc * corr[:, None] + pltriton.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    D = q.shape[-1]
    init = (jnp.zeros((BQ, D), F32), jnp.full((BQ,), MASK_VALUE, F32), jnp.zeros((BQ,), F32))
    acc, m, l = lax.fori_loop(lo // BK, (hi + BK - 1) // BK, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _num_splits(programs: int, S: int, BK: int, target: int = 264) -> int:
    """Enough key splits that the grid has ~``target`` programs (2 per SM of an H100/H200), each at least
    4 key blocks long."""
    want = -(-target // max(programs, 1))
    return max(1, min(want, S // (4 * BK)))


def cache_attention_triton(q, k_cache, v_cache, layer, q_start, kv_start, *, sm_scale: float,
                           block_q: int | None = None, block_k: int | None = None, num_splits: int | None = None,
                           num_warps: int | None = None, num_stages: int = 2, interpret: bool = False):
    """Same contract as :func:`pallas_kernels.attention.xla.cache_attention_xla`. Needs ``S`` a multiple
    of ``block_k`` and a power-of-two ``D >= 16`` (the op checks and falls back to XLA otherwise)."""
    B, T, N, D = q.shape
    L, _, K, S, _ = k_cache.shape
    G = N // K
    R = T * G
    wide = jnp.dtype(q.dtype).itemsize > 2  # float32 tiles take twice the shared memory: halve them
    if block_q is None:
        block_q = 16 if R <= 16 else 32 if R <= 32 else 64 if R <= 64 or wide else 128
    BQ = block_q
    BK = block_k if block_k is not None else (32 if wide else 128 if R <= 64 else 64)
    if S % BK:
        raise ValueError(f"cache_attention_triton: cache length S = {S} must be a multiple of block_k = {BK}")
    n_rb = -(-R // BQ)
    R_pad = n_rb * BQ
    splits = num_splits if num_splits is not None else _num_splits(n_rb * B * K, S, BK)
    split_len = -(-(-(-S // splits)) // BK) * BK
    splits = -(-S // split_len)
    if num_warps is None:
        num_warps = 4 if BQ <= 64 else 8
    # rows (t, g) of each KV head: [B, T, K, G, D] -> [B, K, T*G, D], zero rows up to a whole tile
    qr = jnp.transpose(q.reshape(B, T, K, G, D), (0, 2, 1, 3, 4)).reshape(B, K, R, D)
    if R_pad != R:
        qr = jnp.pad(qr, ((0, 0), (0, 0), (0, R_pad - R), (0, 0)))
    meta = jnp.stack([jnp.broadcast_to(q_start, (B,)), kv_start, jnp.broadcast_to(layer, (B,)),
                      jnp.zeros((B,), jnp.int32)], axis=1).astype(jnp.int32)  # [B, 4]
    precision = lax.Precision.HIGHEST if q.dtype == F32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, G=G, T=T, S=S, BQ=BQ, BK=BK, split_len=split_len,
                               scale=sm_scale * LOG2E, precision=precision)
    whole = pl.no_block_spec  # the whole stacked cache; the kernel indexes layer, row and head itself
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(n_rb, B, K, splits),
        in_specs=[
            pl.BlockSpec((None, 4), lambda r, b, h, s: (b, 0)),
            pl.BlockSpec((None, None, BQ, D), lambda r, b, h, s: (b, h, r, 0)),
            whole, whole,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, BQ, D), lambda r, b, h, s: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, BQ), lambda r, b, h, s: (b, h, s, r)),
            pl.BlockSpec((None, None, None, BQ), lambda r, b, h, s: (b, h, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, splits, R_pad, D), F32),
            jax.ShapeDtypeStruct((B, K, splits, R_pad), F32),
            jax.ShapeDtypeStruct((B, K, splits, R_pad), F32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="m1_cache_attention",
    )(meta, qr, k_cache, v_cache)
    # merge the splits (log2 domain statistics)
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)  # [B, K, splits, R_pad]
    l_all = jnp.sum(w * l, axis=2)
    o = jnp.sum(w[..., None] * acc, axis=2)
    o = jnp.where(l_all[..., None] > 0, o / jnp.where(l_all > 0, l_all, 1.0)[..., None], 0.0)
    o = o[:, :, :R].reshape(B, K, T, G, D)
    return jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(B, T, N, D).astype(q.dtype)


# ------------------------------------------------------------------------------------- packed training
def flash_attention_triton(q, k, v, segment_ids, *, sm_scale: float, causal: bool = True, interpret: bool = False):
    """Packed-row causal self-attention through jax's Triton flash kernel
    (``jax.experimental.pallas.ops.gpu.attention.mha``: segment ids, causal mask, fused Triton backward).

    That kernel wants as many KV heads as query heads, so GQA repeats K and V (the VJP of the repeat sums
    the group's gradients), and T a multiple of its 128-row tiles: the rows are padded at the end with a
    document id of their own, which no real query can see.
    """
    import warnings

    with warnings.catch_warnings():  # jax >= 0.11.2 marks the module deprecated (tokamax replaces it)
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

    B, T, N, D = q.shape
    K = k.shape[2]
    tile = 128 if T >= 128 else max(32, 1 << (T - 1).bit_length())
    pad = -T % tile
    seg = segment_ids.astype(jnp.int32)
    if pad:
        grow = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
        q, k, v = grow(q), grow(k), grow(v)
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
    if K != N:
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    blocks = jax_attention.BlockSizes(block_q=min(128, tile), block_k=min(128, tile), block_q_dkv=32,
                                      block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
    o = jax_attention.mha(q, k, v, seg, sm_scale=sm_scale, causal=causal, block_sizes=blocks, interpret=interpret)
    return o[:, :T]
