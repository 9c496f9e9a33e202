"""The softmax-attention layer: GQA, causal, partial RoPE, 1/sqrt(d) scale, float32 softmax."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1_jax.config import ModelConfig
from m1_jax.model.layers import as_dtype, param
from m1_jax.model.rope import apply_rope, rope_cos_sin
from m1_jax.model.cache import KV_AXES
from pallas_kernels import attention as attention_kernels
from sharding import context_parallel
from sharding.rules import constrain, current_mesh, logical_to_mesh_spec

_Q = ("activation_batch", "activation_length", "activation_heads", None)
_KV = ("activation_batch", "activation_length", "activation_kv_heads", None)


# cuDNN's fused attention rejects some sequence lengths (jax 0.11.2 on H100: "Unsupported sequence
# length Q 4133, KV 4133"); whole multiples of 128 are always taken.
CUDNN_SEQ_MULTIPLE = 128


def _cudnn_suits(q) -> bool:
    """cuDNN flash attention: NVIDIA GPU, half-precision operands, head_dim a multiple of 8 up to 128."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def causal_attention(q, k, v, *, segment_ids=None, implementation=None):
    """Causal GQA attention on ``[B, T, N, D]`` / ``[B, S, K, D]`` through ``jax.nn.dot_product_attention``.

    ``implementation=None`` picks cuDNN flash attention where it applies (GPU, bf16/fp16, unpacked rows)
    and XLA elsewhere; XLA keeps the softmax statistics in float32. With ``segment_ids`` a token attends
    only within its own document: packed rows take the segment-aware flash path
    (``pallas_kernels.attention.flash_attention``: jax's Triton flash kernel on NVIDIA GPUs, blockwise XLA
    with a flash-style VJP elsewhere), never a dense ``[B, 1, T, T]`` mask; an explicit
    ``implementation`` keeps ``jax.nn.dot_product_attention`` with that mask.
    """
    if segment_ids is not None and implementation is None:
        return attention_kernels.flash_attention(q, k, v, segment_ids=segment_ids, causal=True)
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
    if implementation is None:
        implementation = "cudnn" if mask is None and _cudnn_suits(q) else "xla"
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,  # noqa: E731
                                                          implementation=implementation)
    if implementation == "cudnn":
        return padded_causal(attend, q, k, v, CUDNN_SEQ_MULTIPLE)
    return attend(q, k, v)


def padded_causal(attend, q, k, v, multiple):
    """Causal self-attention with T zero-padded at the end to a multiple of ``multiple``: exact, since
    no real query sees a later key; the padded query rows are dropped (their cotangents are zero)."""
    T = q.shape[1]
    pad = -T % multiple
    if pad == 0 or k.shape[1] != T:
        return attend(q, k, v)
    grow = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
    return attend(grow(q), grow(k), grow(v))[:, :T]


class SoftmaxAttention(nnx.Module):
    """MiniMax softmax attention (attn_type 1): q/k/v/o projections without bias, GQA."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt = as_dtype(c.param_dtype)
        n, kv, d, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        std = c.initializer_range
        self.q_proj = param(rngs, (h, n, d), ("embed", "heads", "head_dim"), pdt, std=std)
        self.k_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pdt, std=std)
        self.v_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pdt, std=std)
        self.o_proj = param(rngs, (n, d, h), ("heads", "head_dim", "embed"), pdt, std=std)

    def project_qkv(self, x: jax.Array, positions: jax.Array):
        """Projected q ``[B, T, N, D]`` and k, v ``[B, T, K, D]``, RoPE applied to q and k."""
        c = self.config
        dt = x.dtype
        q = jnp.einsum("bth,hnd->btnd", x, self.q_proj.value.astype(dt))
        k = jnp.einsum("bth,hnd->btnd", x, self.k_proj.value.astype(dt))
        v = jnp.einsum("bth,hnd->btnd", x, self.v_proj.value.astype(dt))
        cos, sin = rope_cos_sin(positions, c.rotary_dim, c.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, o: jax.Array) -> jax.Array:
        return jnp.einsum("btnd,ndh->bth", o, self.o_proj.value.astype(o.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array, *, segment_ids=None, cache: KVSlot | None = None):
        """The layer on ``x [B, T, hidden]``; returns ``out``, or ``(out, new_cache)`` with a cache.

        With ``cache`` (this layer's slot of the stacked KV cache) the rotated keys and values are written
        at slots ``[length, length + T)`` and the queries attend to the cache through
        ``pallas_kernels.attention.cache_attention`` (flash attention over key blocks, per-row
        ``kv_start``); without it, causal self-attention (packed rows through the segment-aware flash path).
        """
        q, k, v = self.project_qkv(x, positions)
        q, k, v = constrain(q, _Q), constrain(k, _KV), constrain(v, _KV)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("SoftmaxAttention: segment_ids (packed rows) cannot be combined with a cache")
            cache = cache.write(k, v)
            o = sharded_cache_attention(q, cache)
            return self.output(constrain(o, _Q)), cache
        # sequence sharded over "context" (mesh from jax.set_mesh): all-gather K/V; else the plain kernel
        o = context_parallel.causal_attention(q, k, v, segment_ids=segment_ids,
                                              attention_fn=lambda q, k, v, s: causal_attention(q, k, v, segment_ids=s))
        return self.output(constrain(o, _Q))


class KVSlot(NamedTuple):
    """One softmax layer's view of the stacked KV cache: the stacked ``keys / values [L, B, K, S, D]``,
    this layer's ``index`` in them, the filled ``length`` and each row's first real slot ``kv_start``."""

    keys: jax.Array
    values: jax.Array
    index: jax.Array
    length: jax.Array
    kv_start: jax.Array

    def write(self, k, v) -> "KVSlot":
        """Store ``k, v [B, T, K, D]`` at slots ``[length, length + T)`` of this layer, in place."""
        at = (self.index, 0, 0, self.length, 0)
        put = lambda buf, x: jax.lax.dynamic_update_slice(  # noqa: E731
            buf, jnp.swapaxes(x, 1, 2)[None].astype(buf.dtype), at)
        return self._replace(keys=put(self.keys, k), values=put(self.values, v))


def sharded_cache_attention(q, cache: KVSlot):
    """``cache_attention`` of ``q [B, T, N, D]`` over this layer's cache. On a mesh it runs per shard
    (``jax.shard_map``: rows over the batch axes, heads over ``tensor`` when query and KV heads split alike),
    so the Pallas kernel never sees a global array GSPMD would have to gather."""
    def attend(q, keys, values, index, length, kv_start):
        return attention_kernels.cache_attention(q, keys, values, layer=index, q_start=length, kv_start=kv_start)

    mesh = current_mesh()
    args = (q, cache.keys, cache.values, cache.index, cache.length, cache.kv_start)
    if mesh is None or all(s == 1 for s in dict(mesh.shape).values()):
        return attend(*args)
    qspec = logical_to_mesh_spec(("activation_batch", None, "activation_heads", None), q.shape, mesh)
    kspec = logical_to_mesh_spec(KV_AXES, cache.keys.shape, mesh)
    bq = qspec[0] if len(qspec) > 0 else None
    bk = kspec[1] if len(kspec) > 1 else None
    hq = qspec[2] if len(qspec) > 2 else None
    hk = kspec[2] if len(kspec) > 2 else None
    if hq != hk:  # GQA groups would not line up across head shards: keep heads whole
        hq = hk = None
    b = bq if bq == bk else None
    f = jax.shard_map(attend, mesh=mesh,
                      in_specs=(P(b, None, hq, None), P(None, b, hk, None, None), P(None, b, hk, None, None),
                                P(), P(), P(b)),
                      out_specs=P(b, None, hq, None), check_vma=False)
    return f(*args)
