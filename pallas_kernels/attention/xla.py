"""Blockwise softmax attention in plain XLA (online softmax over key blocks): the CPU path and the
fallback of every backend. Neither function ever holds a ``T x S`` score matrix: one key block at a time.

* :func:`cache_attention_xla`: queries of a prefill chunk (or one decode token) against a KV cache,
  with a per-row visible key range ``[kv_start, q_slot]``. Inference only (no VJP).
* :func:`flash_attention_xla`: causal self-attention with packed documents (``segment_ids``), with a
  ``custom_vjp`` that recomputes the scores block by block in the backward (flash-attention style), so
  training memory stays ``O(T)`` per row and head.

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
def _pad_keys(x, seg, BK):
    T = x.shape[1]
    pad = -T % BK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    return x, seg


def _blocks(x, BK):
    """``[B, S, K, D] -> [S/BK, B, BK, K, D]`` (scan over the leading axis)."""
    B, S = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, S // BK, BK, *x.shape[2:]), 1, 0)


def _block_mask(q_seg, k_seg_blk, j, BK, T, causal):
    """``[B, T, BK]``: same document, and (causal) key position <= query position."""
    kpos = j * BK + jnp.arange(BK)
    vis = q_seg[:, :, None] == k_seg_blk[:, None, :]
    if causal:
        vis = vis & (kpos[None, None, :] <= jnp.arange(T)[None, :, None])
    return vis


def _flash_fwd(q, k, v, seg, sm_scale, causal, BK):
    B, T, N, D = q.shape
    K = k.shape[2]
    G = N // K
    kp, kseg = _pad_keys(k, seg, BK)
    vp, _ = _pad_keys(v, seg, BK)
    qg = q.reshape(B, T, K, G, D)
    xs = (_blocks(kp, BK), _blocks(vp, BK), jnp.moveaxis(kseg.reshape(B, -1, BK), 1, 0),
          jnp.arange(kp.shape[1] // BK))

    def body(carry, x):
        m, l, acc = carry
        kb, vb, sb, j = x
        vis = _block_mask(seg, sb, j, BK, T, causal)[:, None, None]  # [B, 1, 1, T, BK]
        s = jnp.where(vis, _einsum("btkgd,bskd->bkgts", qg, kb) * sm_scale, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + _einsum("bkgts,bskd->bkgtd", p, vb.astype(F32))
        return (m_new, l, acc), None

    init = (jnp.full((B, K, G, T), MASK_VALUE, F32), jnp.zeros((B, K, G, T), F32), jnp.zeros((B, K, G, T, D), F32))
    (m, l, acc), _ = lax.scan(body, init, xs)
    safe_l = jnp.where(l > 0, l, 1.0)
    o = jnp.where(l[..., None] > 0, acc / safe_l[..., None], 0.0)  # [B, K, G, T, D]
    lse = jnp.where(l > 0, m + jnp.log(safe_l), jnp.inf)  # inf: p = exp(s - lse) = 0 in the backward
    out = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, N, D).astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, seg, sm_scale, causal, BK):
    return _flash_fwd(q, k, v, seg, sm_scale, causal, BK)[0]


def _flash_vjp_fwd(q, k, v, seg, sm_scale, causal, BK):
    out, lse = _flash_fwd(q, k, v, seg, sm_scale, causal, BK)
    return out, (q, k, v, seg, out, lse)


def _flash_vjp_bwd(sm_scale, causal, BK, res, do):
    q, k, v, seg, out, lse = res
    B, T, N, D = q.shape
    S0, K = k.shape[1], k.shape[2]
    G = N // K
    kp, kseg = _pad_keys(k, seg, BK)
    vp, _ = _pad_keys(v, seg, BK)
    qg = q.reshape(B, T, K, G, D)
    dog = do.reshape(B, T, K, G, D)
    delta = jnp.sum(dog.astype(F32) * out.reshape(B, T, K, G, D).astype(F32), axis=-1)  # [B, T, K, G]
    delta = jnp.transpose(delta, (0, 2, 3, 1))  # [B, K, G, T]
    xs = (_blocks(kp, BK), _blocks(vp, BK), jnp.moveaxis(kseg.reshape(B, -1, BK), 1, 0),
          jnp.arange(kp.shape[1] // BK))

    def body(dq, x):
        kb, vb, sb, j = x
        vis = _block_mask(seg, sb, j, BK, T, causal)[:, None, None]
        s = _einsum("btkgd,bskd->bkgts", qg, kb) * sm_scale
        p = jnp.where(vis, jnp.exp(s - lse[..., None]), 0.0)  # [B, K, G, T, BK]
        dv = _einsum("bkgts,btkgd->bskd", p, dog.astype(F32))
        dp = _einsum("btkgd,bskd->bkgts", dog, vb)
        ds = p * (dp - delta[..., None]) * sm_scale
        dq = dq + _einsum("bkgts,bskd->btkgd", ds, kb.astype(F32))
        dk = _einsum("bkgts,btkgd->bskd", ds, qg.astype(F32))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(body, jnp.zeros((B, T, K, G, D), F32), xs)
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, -1, K, D)[:, :S0]  # noqa: E731
    return (dq.reshape(B, T, N, D).astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None)


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def flash_attention_xla(q, k, v, segment_ids, *, sm_scale: float, causal: bool = True, block_k: int = 512):
    """Self-attention ``q [B, T, N, D]``, ``k, v [B, T, K, D]`` (GQA: q head n reads kv head n // (N/K))
    within documents (``segment_ids [B, T]``), causal by default; differentiable (custom VJP)."""
    T = q.shape[1]
    BK = min(block_k, max(T, 1))
    return _flash(q, k, v, segment_ids.astype(jnp.int32), float(sm_scale), bool(causal), int(BK))
