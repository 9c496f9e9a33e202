"""The public softmax-attention ops: input checks and backend dispatch.

* :func:`cache_attention`: queries against a preallocated KV cache (chunked prefill and decoding).
* :func:`flash_attention`: causal self-attention over packed rows (``segment_ids``), differentiable; also
  queries at an offset inside a longer key sequence (``q_offset``: context-parallel shards).

Backends: ``"xla"`` (blockwise online softmax, every platform), ``"pallas_gpu"`` (Pallas with the
Triton lowering; ``interpret=True`` runs it on the CPU), ``"auto"`` (Pallas on NVIDIA GPUs where the
shapes suit it, XLA elsewhere). TPU runs the XLA path (the TPU flash/splash kernels are not wired yet).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.attention import gpu_triton, xla

BACKENDS = ("auto", "xla", "pallas_gpu")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _check_backend(name: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend={backend!r}; expected one of {BACKENDS}")


def _triton_suits(D: int, dtype) -> bool:
    return D >= 16 and D & (D - 1) == 0 and D <= 256 and jnp.dtype(dtype) in (*_HALF, jnp.dtype(jnp.float32))


def cache_block_k(S: int) -> int | None:
    """The key block of the Pallas cache kernel for a cache of ``S`` slots (None: S fits no block)."""
    for bk in (128, 64, 32, 16):
        if S % bk == 0:
            return bk
    return None


def cache_attention(q, k_cache, v_cache, *, q_start, kv_start, layer=None, sm_scale: float | None = None,
                    backend: str = "auto", interpret: bool = False, block_k: int | None = None,
                    num_splits: int | None = None):
    """Softmax attention of new queries over a KV cache, never materialising ``T x S`` scores.

    Args:
      q: ``[B, T, N, D]`` queries at cache slots ``q_start + t`` (their keys already written there).
      k_cache, v_cache: ``[B, K, S, D]``, or the stacked ``[L, B, K, S, D]`` of several layers with
        ``layer`` (int32 scalar) selecting one; ``N`` must be a multiple of ``K`` (GQA: query head ``n``
        reads KV head ``n // (N / K)``).
      q_start: int32 scalar or ``[B]``: the slot of ``q[:, 0]``.
      kv_start: int32 ``[B]``: each row's first visible slot (left padding ends there).
      sm_scale: score scale, default ``1 / sqrt(D)``.
      backend: ``"auto"``, ``"xla"`` or ``"pallas_gpu"``; ``interpret`` runs Pallas on the CPU.
      block_k, num_splits: kernel tiling (``num_splits`` only for Pallas: key ranges run in parallel,
        flash-decoding style; default from the grid size).

    Key slot ``s`` is visible to query ``t`` of row ``b`` iff ``kv_start[b] <= s <= q_start[b] + t``; a
    query that sees no key (left padding) gets zeros. Softmax statistics are float32.

    Returns:
      ``[B, T, N, D]`` in q's dtype.
    """
    _check_backend("cache_attention", backend)
    if q.ndim != 4:
        raise ValueError(f"cache_attention: q must be [B, T, N, D]; got shape {q.shape}")
    stacked = k_cache.ndim == 5
    if k_cache.ndim not in (4, 5) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache_attention: k_cache and v_cache must both be [B, K, S, D] or [L, B, K, S, D]; "
                         f"got {k_cache.shape} and {v_cache.shape}")
    if stacked and layer is None:
        raise ValueError("cache_attention: a stacked [L, B, K, S, D] cache needs layer=")
    if not stacked:
        if layer is not None:
            raise ValueError("cache_attention: layer= is for stacked [L, B, K, S, D] caches only")
        k_cache, v_cache = k_cache[None], v_cache[None]
        layer = 0
    B, T, N, D = q.shape
    _, Bc, K, S, Dc = k_cache.shape
    if Bc != B or Dc != D or N % K:
        raise ValueError(f"cache_attention: cache [.., B={Bc}, K={K}, S={S}, D={Dc}] does not fit q "
                         f"[B={B}, T={T}, N={N}, D={D}] (same B and D, N a multiple of K)")
    kv_start = jnp.asarray(kv_start, jnp.int32)
    if kv_start.shape != (B,):
        raise ValueError(f"cache_attention: kv_start must be [B] = [{B}]; got shape {kv_start.shape}")
    q_start = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32), (B,))
    layer = jnp.asarray(layer, jnp.int32)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if backend == "auto":
        backend = "pallas_gpu" if _on_gpu() and _triton_suits(D, q.dtype) and cache_block_k(S) else "xla"
    if backend == "pallas_gpu":
        bk = block_k or (min(32, cache_block_k(S) or 32) if jnp.dtype(q.dtype).itemsize > 2 else cache_block_k(S))
        if not _triton_suits(D, q.dtype) or bk is None or S % bk:
            raise ValueError(f"cache_attention: backend 'pallas_gpu' needs a power-of-two head_dim in [16, 256] "
                             f"and S a multiple of 16; got D = {D}, S = {S}, dtype {q.dtype}")
        return gpu_triton.cache_attention_triton(q, k_cache, v_cache, layer, q_start, kv_start, sm_scale=scale,
                                                 block_k=bk, num_splits=num_splits, interpret=interpret)
    return xla.cache_attention_xla(q, k_cache, v_cache, layer, q_start, kv_start, sm_scale=scale,
                                   block_k=block_k or 512)


def _static_zero(x) -> bool:
    """``x`` is the Python (or concrete) integer 0, not a traced value."""
    try:
        return int(x) == 0
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return False


def flash_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                    backend: str = "auto", interpret: bool = False, q_offset=0, kv_segment_ids=None,
                    block_q: int | None = None, block_k: int | None = None):
    """Self-attention of packed rows: ``q [B, T, N, D]``, ``k, v [B, T, K, D]`` (GQA), a token attends to
    the tokens of its own document (``segment_ids [B, T]``; contiguous or not) at or before it.
    Differentiable. ``"auto"``: jax's Triton flash kernel on NVIDIA GPUs for bf16/f16, the XLA blockwise
    path (custom VJP) elsewhere. Returns ``[B, T, N, D]`` in q's dtype.

    Queries inside a longer key sequence (context parallelism over gathered keys): ``k, v [B, S, K, D]``,
    query ``t`` at key position ``q_offset + t`` (int or traced int32 scalar), ``kv_segment_ids [B, S]``
    the keys' documents (needed when S != T, and when ``segment_ids`` is given). This form runs the XLA
    blockwise path (jax's Triton kernel has no query offset); ``block_q`` / ``block_k`` size its tiles
    (default 512)."""
    _check_backend("flash_attention", backend)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention: q must be [B, T, N, D] and k, v [B, S, K, D]; "
                         f"got q{q.shape} k{k.shape} v{v.shape}")
    B, T, N, D = q.shape
    S = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D or N % k.shape[2]:
        raise ValueError(f"flash_attention: k, v must be [B={B}, S, K, D={D}] with K dividing N = {N}; "
                         f"got {k.shape}")
    offset_form = S != T or kv_segment_ids is not None or not _static_zero(q_offset)
    if offset_form and segment_ids is not None and kv_segment_ids is None:
        raise ValueError("flash_attention: segment_ids of the queries with keys at an offset (q_offset / S != T) "
                         "need kv_segment_ids [B, S] of the keys")
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    if seg.shape != (B, T):
        raise ValueError(f"flash_attention: segment_ids must be [B, T] = {(B, T)}; got {seg.shape}")
    kseg = None
    if offset_form:
        kseg = jnp.zeros((B, S), jnp.int32) if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
        if kseg.shape != (B, S):
            raise ValueError(f"flash_attention: kv_segment_ids must be [B, S] = {(B, S)}; got {kseg.shape}")
        if jnp.ndim(q_offset) != 0:
            raise ValueError(f"flash_attention: q_offset must be a scalar; got shape {jnp.shape(q_offset)}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and (not isinstance(b, int) or b < 1):
            raise ValueError(f"flash_attention: {name} = {b!r}; expected a positive int")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if backend == "auto":
        backend = "pallas_gpu" if (_on_gpu() and not offset_form and jnp.dtype(q.dtype) in _HALF and D <= 256) \
            else "xla"
    if backend == "pallas_gpu":
        if offset_form:
            raise ValueError("flash_attention: backend 'pallas_gpu' is self-attention only (S = T, q_offset = 0, "
                             "no kv_segment_ids); use backend 'xla' or 'auto' for queries at an offset")
        return gpu_triton.flash_attention_triton(q, k, v, seg, sm_scale=scale, causal=causal, interpret=interpret)
    return xla.flash_attention_xla(q, k, v, seg, sm_scale=scale, causal=causal, block_q=block_q or 512,
                                   block_k=block_k or 512, q_offset=q_offset, kv_segment_ids=kseg)
