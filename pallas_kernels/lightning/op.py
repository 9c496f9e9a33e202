"""The public lightning-attention op: input checks and backend dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.lightning import reference

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
DEFAULT_BLOCK_SIZE = 256


def _check_inputs(q, k, v, decay, initial_state, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"lightning_attention: q, k, v must be [B, H, T, D]; got q{q.shape} k{k.shape} v{v.shape}")
    if q.shape != k.shape:
        raise ValueError(f"lightning_attention: q and k must have the same shape [B, H, T, Dk]; got q{q.shape} k{k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning_attention: v must be [B, H, T, Dv] with q's B, H, T = {q.shape[:3]}; got v{v.shape}")
    B, H, T, Dk = q.shape
    if decay.shape != (H,):
        raise ValueError(f"lightning_attention: decay must be [H] = [{H}] (one rate per head); got {decay.shape}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"lightning_attention: initial_state must be [B, H, Dk, Dv] = "
                         f"{(B, H, Dk, v.shape[-1])}; got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"lightning_attention: segment_ids must be [B, T] = {(B, T)}; got {segment_ids.shape}")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"lightning_attention: backend={backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "reference"  # Pallas backends are selected here once they exist (see pallas_kernels/lightning/)


def lightning_attention(q, k, v, decay, *, initial_state=None, block_size=None, backend="auto",
                        interpret=False, segment_ids=None):
    """Lightning attention (linear attention with per-head exponential decay).

    Args:
      q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]`` (bf16 or float32). No scale is applied.
      decay: ``[H]`` float32 rates lambda; the per-step factor is ``exp(-lambda)``.
      initial_state: optional ``[B, H, Dk, Dv]`` float32 state entering the sequence.
      block_size: chunk length (default 256); it changes rounding only, never the result.
      backend: ``"reference"``, ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"auto"``.
      interpret: run Pallas backends in interpret mode (on the CPU).
      segment_ids: optional ``[B, T]`` int document ids for packed rows; the state restarts at each
        document start.

    Returns:
      ``(o, final_state)``: o ``[B, H, T, Dv]`` in q's dtype, final_state ``[B, H, Dk, Dv]`` float32.
    """
    _check_inputs(q, k, v, decay, initial_state, segment_ids)
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if block_size <= 0:
        raise ValueError(f"lightning_attention: block_size must be positive; got {block_size}")
    backend = resolve_backend(backend)
    decay = decay.astype(jnp.float32)
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    if backend == "reference":
        return reference.lightning_attention_chunked(q, k, v, decay, initial_state, block_size, segment_ids)
    raise NotImplementedError(f"lightning_attention: backend {backend!r} is not available yet")
