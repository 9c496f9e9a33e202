"""Blockwise softmax attention in plain XLA (online softmax over key blocks): the CPU path and the
fallback of every backend. Neither function ever holds a ``T x S`` score matrix: one key block at a time.

* :func:`cache_attention_xla`: queries of a prefill chunk (or one decode token) against a KV cache,
  with a per-row visible key range ``[kv_start, q_slot]``. Inference only (no VJP).
* :func:`flash_attention_xla`: causal attention with packed documents (``segment_ids``), blocked over
  queries and keys (a query block visits only the key blocks it can see), with a ``custom_vjp`` that
  recomputes the scores block by block in the backward (flash-attention style), so training memory
  stays ``O(T)`` per row and head. Queries may sit at an offset inside a longer key sequence
  (``q_offset``, ``kv_segment_ids``): the context-parallel softmax layers attend a shard's queries over
  the all-gathered keys with it.

Softmax statistics are float32; scores use ``preferred_element_type=float32`` with HIGHEST precision
(exact float32 on every platform, no TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
_HI = lax.Precision.HIGHEST
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
PAD_SEGMENT = int(jnp.iinfo(jnp.int32).min)  # document id of key padding (never a real id under causal masks)


def _einsum(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HI, preferred_element_type=F32)


# ------------------------------------------------------------------------------------- cache attention
def cache_attention_xla(q, k_cache, v_cache, layer, q_start, kv_start, *, sm_scale: float, block_k: int = 512):
    """``q [B, T, N, D]`` at slots ``q_start[b] + t``; caches ``[L, B, K, S, D]`` read at ``layer``;
    key slot ``s`` is visible to query ``t`` of row ``b`` iff ``kv_start[b] <= s <= q_start[b] + t``.
    Rows that see no key return zeros. Returns ``[B, T, N, D]`` in q's dtype."""
    B, T, N, D = q.shape
    _, _, K, S, _ = k_cache.shape
    G = N // K
    BK = min(block_k, S)
    n_blocks = -(-S // BK)
    qg = q.reshape(B, T, K, G, D)
    q_slot = q_start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    # only the key blocks some row can see: [min kv_start, max last query slot]
    lo = jnp.min(kv_start) // BK
    hi = jnp.minimum(-(-(jnp.max(q_start) + T) // BK), n_blocks)

    def body(j, carry):
        m, l, acc = carry  # [B, K, G, T], same, [B, K, G, T, D]
        start = jnp.minimum(j * BK, S - BK)  # the last block may overlap the previous one ...
        kb = lax.dynamic_slice(k_cache, (layer, 0, 0, start, 0), (1, B, K, BK, D))[0]
        vb = lax.dynamic_slice(v_cache, (layer, 0, 0, start, 0), (1, B, K, BK, D))[0]
        slot = start + jnp.arange(BK, dtype=jnp.int32)
        vis = ((slot[None, None, :] >= kv_start[:, None, None]) & (slot[None, None, :] <= q_slot[:, :, None])
               & (slot >= j * BK)[None, None, :])  # ... whose slots are masked out here
        s = _einsum("btkgd,bksd->bkgts", qg, kb) * sm_scale
        vis = vis[:, None, None]  # [B, 1, 1, T, BK]
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + _einsum("bkgts,bksd->bkgtd", p, vb.astype(F32))
        return m_new, l, acc

    init = (jnp.full((B, K, G, T), MASK_VALUE, F32), jnp.zeros((B, K, G, T), F32),
            jnp.zeros((B, K, G, T, D), F32))
    _, l, acc = lax.fori_loop(lo, hi, body, init)
    o = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, N, D).astype(q.dtype)


# ------------------------------------------------------------------------------------- packed training
# Queries and keys are both cut into blocks: a query block loops only over the key blocks it can see
# (causal: up to its last position), so the causal triangle costs half and a query block's scores are
# ``[B, K, G, BQ, BK]`` whatever T is. Queries may sit at an offset inside a longer key sequence
# (``q_offset``: context parallelism attends a shard's queries over the gathered keys).
def _pad_rows(x, n, value=0):
    pad = -x.shape[1] % n
    if not pad:
        return x
    widths = ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value)


def _q_blocks(x, BQ):
    """``[B, T, ...] -> [T/BQ, B, BQ, ...]`` (T already a multiple of BQ)."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, T // BQ, BQ, *x.shape[2:]), 1, 0)


def _q_unblock(x, T):
    """Inverse of :func:`_q_blocks`, cut back to T rows."""
    n, B, BQ = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * BQ, *x.shape[3:])[:, :T]


def _visible(q_seg, k_seg, q_pos, k_pos, S, causal):
    """``[B, BQ, BK]``: a real key (position < S) of the query's document, at or before it (causal)."""
    vis = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos < S)[None, None, :]
    if causal:
        vis = vis & (k_pos[None, None, :] <= q_pos[None, :, None])
    return vis


def _key_block(kp, vp, ksp, j, BK, q_seg, q_pos, S, causal):
    """Key block ``j``: its keys and values, and the ``[B, 1, 1, BQ, BK]`` mask of what the queries see."""
    kb = lax.dynamic_slice_in_dim(kp, j * BK, BK, axis=1)
    vb = lax.dynamic_slice_in_dim(vp, j * BK, BK, axis=1)
    k_seg = lax.dynamic_slice_in_dim(ksp, j * BK, BK, axis=1)
    return kb, vb, _visible(q_seg, k_seg, q_pos, j * BK + jnp.arange(BK), S, causal)[:, None, None]


def _key_blocks_seen(i, q_offset, BQ, BK, nk, causal):
    """Key blocks ``[0, hi)`` that query block ``i`` can see."""
    if not causal:
        return nk
    return jnp.clip((q_offset + (i + 1) * BQ - 1) // BK + 1, 0, nk)


def _mm_dtype(x):
    """Operand dtype of the probability / score-gradient products: half inputs keep half operands
    (float32 accumulation, as flash kernels do); float32 inputs stay float32."""
    return x.dtype if jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else F32


def _flash_fwd(q, k, v, qseg, kseg, q_offset, sm_scale, causal, BQ, BK):
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    kp, vp, ksp = _pad_rows(k, BK), _pad_rows(v, BK), _pad_rows(kseg, BK, PAD_SEGMENT)
    nk = kp.shape[1] // BK
    qb = _q_blocks(_pad_rows(q, BQ).reshape(B, -1, K, G, D), BQ)  # [nq, B, BQ, K, G, D]
    sb = _q_blocks(_pad_rows(qseg, BQ), BQ)  # [nq, B, BQ]
    mdt = _mm_dtype(v)

    def q_block(args):
        qi, si, i = args
        q_pos = q_offset + i * BQ + jnp.arange(BQ)

        def body(j, carry):
            m, l, acc = carry
            kb, vb, vis = _key_block(kp, vp, ksp, j, BK, si, q_pos, S, causal)
            s = jnp.where(vis, _einsum("btkgd,bskd->bkgts", qi, kb) * sm_scale, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + _einsum("bkgts,bskd->bkgtd", p.astype(mdt), vb.astype(mdt))
            return m_new, l, acc

        init = (jnp.full((B, K, G, BQ), MASK_VALUE, F32), jnp.zeros((B, K, G, BQ), F32),
                jnp.zeros((B, K, G, BQ, D), F32))
        m, l, acc = lax.fori_loop(0, _key_blocks_seen(i, q_offset, BQ, BK, nk, causal), body, init)
        safe_l = jnp.where(l > 0, l, 1.0)
        o = jnp.where(l[..., None] > 0, acc / safe_l[..., None], 0.0)  # [B, K, G, BQ, D]
        lse = jnp.where(l > 0, m + jnp.log(safe_l), jnp.inf)  # inf: p = exp(s - lse) = 0 in the backward
        return jnp.transpose(o, (0, 3, 1, 2, 4)), jnp.transpose(lse, (0, 3, 1, 2))  # [B, BQ, K, G, (D)]

    o, lse = lax.map(q_block, (qb, sb, jnp.arange(qb.shape[0])))
    out = _q_unblock(o, T).reshape(B, T, N, D).astype(q.dtype)
    return out, _q_unblock(lse, T)  # lse [B, T, K, G]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, qseg, kseg, q_offset, sm_scale, causal, BQ, BK):
    return _flash_fwd(q, k, v, qseg, kseg, q_offset, sm_scale, causal, BQ, BK)[0]


def _flash_vjp_fwd(q, k, v, qseg, kseg, q_offset, sm_scale, causal, BQ, BK):
    out, lse = _flash_fwd(q, k, v, qseg, kseg, q_offset, sm_scale, causal, BQ, BK)
    return out, (q, k, v, qseg, kseg, q_offset, out, lse)


def _flash_vjp_bwd(sm_scale, causal, BQ, BK, res, do):
    q, k, v, qseg, kseg, q_offset, out, lse = res
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    kp, vp, ksp = _pad_rows(k, BK), _pad_rows(v, BK), _pad_rows(kseg, BK, PAD_SEGMENT)
    nk = kp.shape[1] // BK
    grp = lambda x: _q_blocks(_pad_rows(x, BQ).reshape(B, -1, K, G, D), BQ)  # noqa: E731
    qb, dob = grp(q), grp(do)
    delta = jnp.sum(do.astype(F32).reshape(B, T, K, G, D) * out.astype(F32).reshape(B, T, K, G, D), axis=-1)
    # padded query rows: lse = inf, so their probabilities (and every gradient they add) are zero
    lseb = _q_blocks(_pad_rows(lse, BQ, jnp.inf), BQ)  # [nq, B, BQ, K, G]
    deltab = _q_blocks(_pad_rows(delta, BQ), BQ)
    sb = _q_blocks(_pad_rows(qseg, BQ), BQ)
    nq = qb.shape[0]
    mdt = _mm_dtype(v)

    def q_step(i, carry):
        dq, dk, dv = carry
        qi, doi, si = qb[i], dob[i], sb[i]
        lse_i = jnp.transpose(lseb[i], (0, 2, 3, 1))  # [B, K, G, BQ]
        delta_i = jnp.transpose(deltab[i], (0, 2, 3, 1))
        q_pos = q_offset + i * BQ + jnp.arange(BQ)

        def k_step(j, c):
            dqi, dk, dv = c
            kb, vb, vis = _key_block(kp, vp, ksp, j, BK, si, q_pos, S, causal)
            s = _einsum("btkgd,bskd->bkgts", qi, kb) * sm_scale
            p = jnp.where(vis, jnp.exp(s - lse_i[..., None]), 0.0)  # [B, K, G, BQ, BK]
            dv_j = _einsum("bkgts,btkgd->bskd", p.astype(mdt), doi.astype(mdt))
            dp = _einsum("btkgd,bskd->bkgts", doi, vb)
            ds = (p * (dp - delta_i[..., None]) * sm_scale).astype(mdt)
            dqi = dqi + _einsum("bkgts,bskd->btkgd", ds, kb.astype(mdt))
            dk_j = _einsum("bkgts,btkgd->bskd", ds, qi.astype(mdt))
            add = lambda acc, x: lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, lax.dynamic_slice_in_dim(acc, j * BK, BK, axis=1) + x, j * BK, axis=1)
            return dqi, add(dk, dk_j), add(dv, dv_j)

        hi = _key_blocks_seen(i, q_offset, BQ, BK, nk, causal)
        dqi, dk, dv = lax.fori_loop(0, hi, k_step, (jnp.zeros((B, BQ, K, G, D), F32), dk, dv))
        return lax.dynamic_update_index_in_dim(dq, dqi, i, 0), dk, dv

    zeros_kv = jnp.zeros((B, nk * BK, K, D), F32)
    dq, dk, dv = lax.fori_loop(0, nq, q_step, (jnp.zeros((nq, B, BQ, K, G, D), F32), zeros_kv, zeros_kv))
    dq = _q_unblock(dq, T).reshape(B, T, N, D)
    return (dq.astype(q.dtype), dk[:, :S].astype(k.dtype), dv[:, :S].astype(v.dtype), None, None, None)


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def flash_attention_xla(q, k, v, segment_ids, *, sm_scale: float, causal: bool = True, block_k: int = 512,
                        block_q: int = 512, q_offset=0, kv_segment_ids=None):
    """Attention of ``q [B, T, N, D]`` over ``k, v [B, S, K, D]`` (GQA: q head n reads kv head n // (N/K))
    within documents (``segment_ids [B, T]`` of the queries, ``kv_segment_ids [B, S]`` of the keys; the
    same array when S = T and it is omitted), causal by default; differentiable (custom VJP).

    Query ``t`` sits at position ``q_offset + t`` (an int or a traced int32 scalar) and key ``s`` at
    position ``s``, so a causal query sees the keys ``s <= q_offset + t``: ``q_offset = 0`` with S = T is
    plain self-attention, a context shard passes its first global position and the gathered keys.
    A query that sees no key returns zeros. Never holds more than ``[B, K, G, block_q, block_k]`` scores."""
    T, S = q.shape[1], k.shape[1]
    if kv_segment_ids is None:
        if S != T:
            raise ValueError(f"flash_attention_xla: {S} keys for {T} queries need kv_segment_ids [B, {S}]")
        kv_segment_ids = segment_ids
    BQ = max(1, min(int(block_q), T))
    BK = max(1, min(int(block_k), S))
    q_offset = jnp.asarray(q_offset, jnp.int32)
    return _flash(q, k, v, segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32), q_offset,
                  float(sm_scale), bool(causal), int(BQ), int(BK))
