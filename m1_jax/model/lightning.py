"""The lightning-attention layer: fused interleaved qkv, SiLU, decayed linear attention, norm, gate."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.config import ModelConfig
from m1_jax.model.layers import as_dtype, param, rms_normalize
from pallas_kernels import lightning_decode_step_nodonate
from sharding import context_parallel
from sharding.rules import constrain

_BHTD = ("activation_batch", "activation_heads", "activation_length", None)
_BTHD = ("activation_batch", "activation_length", "activation_heads", None)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi base slopes as in the original MiniMax code (``get_slopes``), float64."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(power_of_two(closest) + extra)


def layer_decay_factor(layer_idx, num_layers: int):
    """``1 - l/(L-1) + 1e-5`` over the global layer index (softmax layers counted); L = 1 gives 1 + 1e-5."""
    if num_layers <= 1:
        return 1.0 + 1e-5
    return 1.0 - layer_idx / (num_layers - 1) + 1e-5


def lightning_decay(config: ModelConfig, layer_idx) -> jax.Array:
    """Per-head decay rates ``lambda [H]`` (float32) of global layer ``layer_idx`` (may be traced)."""
    slopes = jnp.asarray(alibi_slopes(config.num_attention_heads), jnp.float32)
    factor = layer_decay_factor(jnp.asarray(layer_idx, jnp.float32), config.num_hidden_layers)
    return slopes * factor


class LightningAttention(nnx.Module):
    """MiniMax lightning attention (attn_type 0).

    ``qkv = silu(x W_qkv)`` with the per-head interleaved layout ``[heads, (q|k|v), head_dim]``;
    ``o = lightning(q, k, v)``; ``o = RMSNorm_{heads*head_dim}(o)`` (eps 1e-6, all heads together);
    ``o = sigmoid(x W_gate) * o``; ``out = o W_out``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt = as_dtype(c.param_dtype)
        n, d, h = c.num_attention_heads, c.head_dim, c.hidden_size
        std = c.initializer_range
        self.qkv_proj = param(rngs, (h, n, 3, d), ("embed", "heads", None, "head_dim"), pdt, std=std)
        self.output_gate = param(rngs, (h, n, d), ("embed", "heads", "head_dim"), pdt, std=std)
        self.norm = param(None, (n, d), ("heads", "head_dim"), pdt, init="ones")
        self.out_proj = param(rngs, (n, d, h), ("heads", "head_dim", "embed"), pdt, std=std)

    def __call__(self, x: jax.Array, layer_idx, *, segment_ids=None, state=None, token_mask=None):
        """The layer on ``x [B, T, hidden]``; returns ``out``, or ``(out, new_state)`` with a cache.

        ``state [B, H, Dk, Dv]`` float32 is this layer's generation cache: the recurrence continues from
        it (prefill chunks through ``lightning_attention(initial_state=...)``, one token through the
        decode step). ``token_mask [B, T]`` (1 = real token) zeroes q, k, v of left padding: exact,
        because padding comes before every real token, where the state is still zero.
        """
        c = self.config
        dt = x.dtype
        qkv = jnp.einsum("bth,hnkd->btnkd", x, self.qkv_proj.value.astype(dt))
        qkv = jax.nn.silu(qkv.astype(jnp.float32)).astype(dt)
        if token_mask is not None:
            qkv = qkv * token_mask.astype(dt)[:, :, None, None, None]
        q, k, v = (constrain(jnp.swapaxes(qkv[:, :, :, i], 1, 2), _BHTD) for i in range(3))  # [B, N, T, D]
        decay = lightning_decay(c, layer_idx)
        if state is not None and x.shape[1] == 1:  # decoding: S' = exp(-lam) S + k^T v, o = q S'
            o, new_state = lightning_decode_step_nodonate(q[:, :, 0], k[:, :, 0], v[:, :, 0], decay, state)
            o = o[:, :, None]
        else:
            # pallas_kernels.lightning_attention, run as LASP-2 when the mesh has a context axis > 1
            o, new_state = context_parallel.lightning_attention(
                q, k, v, decay, initial_state=state, block_size=c.block_size, backend=c.lightning_backend,
                segment_ids=segment_ids)
        o = constrain(jnp.swapaxes(o, 1, 2), _BTHD)  # [B, T, N, D]
        o = rms_normalize(o, c.lightning_norm_eps, axes=(-2, -1)) * self.norm.value.astype(dt)
        gate = jnp.einsum("bth,hnd->btnd", x, self.output_gate.value.astype(dt))
        o = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(dt) * o
        out = jnp.einsum("btnd,ndh->bth", o, self.out_proj.value.astype(dt))
        return out if state is None else (out, new_state)
