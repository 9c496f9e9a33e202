"""The softmax-attention layer: GQA, causal, partial RoPE, 1/sqrt(d) scale, float32 softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax.config import ModelConfig
from m1_jax.model.layers import as_dtype, param
from m1_jax.model.rope import apply_rope, rope_cos_sin
from sharding import context_parallel
from sharding.rules import constrain

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
    only within its own document.
    """
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

    def __call__(self, x: jax.Array, positions: jax.Array, *, segment_ids=None) -> jax.Array:
        q, k, v = self.project_qkv(x, positions)
        q, k, v = constrain(q, _Q), constrain(k, _KV), constrain(v, _KV)
        # sequence sharded over "context" (mesh from jax.set_mesh): all-gather K/V; else the plain kernel
        o = context_parallel.causal_attention(q, k, v, segment_ids=segment_ids,
                                              attention_fn=lambda q, k, v, s: causal_attention(q, k, v, segment_ids=s))
        return self.output(constrain(o, _Q))
