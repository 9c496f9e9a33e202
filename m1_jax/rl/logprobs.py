"""Per-token log-probabilities (and entropies) of the policy from ``model.hidden_states`` and
``model.lm_head``, in float32, a chunk of tokens at a time.

The LM head runs in float32 (the MiniMax-M1 fix: with a low-precision head the trainer's and the
sampler's probabilities disagree enough to stall RL). Logits exist for ``chunk_size`` tokens at a
time only, never for the whole ``[tokens, vocab]``: each chunk is a ``jax.checkpoint``-ed step of a
``lax.scan``, so the backward pass recomputes that chunk's logits instead of storing them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk(hc, w, tc):
    logits = jnp.dot(hc.astype(jnp.float32), w.astype(jnp.float32), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0] - lse
    p = jax.lax.stop_gradient(jnp.exp(logits - lse[:, None]))
    entropy = jax.lax.stop_gradient(lse - jnp.sum(p * logits, axis=-1))
    return logp, entropy


def token_logprobs(h, w, targets, *, chunk_size: int = 1024):
    """``(logp [B, T], entropy [B, T])`` float32: ``log softmax(h @ w)[targets]`` and the entropy of each
    position's distribution (a metric: no gradient).

    Args:
      h: ``[B, T, H]`` final hidden states; w: ``[H, V]`` LM head; targets: ``[B, T]`` int token ids.
    """
    if h.ndim != 3 or targets.shape != h.shape[:2] or w.ndim != 2 or w.shape[0] != h.shape[-1]:
        raise ValueError(f"token_logprobs: expected h [B, T, H], w [H, V], targets [B, T]; got h {h.shape}, "
                         f"w {w.shape}, targets {targets.shape}")
    B, T, H = h.shape
    n = B * T
    chunk = max(1, min(int(chunk_size), n))
    pad = (-n) % chunk
    hf = jnp.pad(h.reshape(n, H), ((0, pad), (0, 0)))
    tf = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
    k = (n + pad) // chunk
    body = jax.checkpoint(_chunk)
    _, (logp, ent) = jax.lax.scan(lambda c, x: (c, body(x[0], w, x[1])), None,
                                  (hf.reshape(k, chunk, H), tf.reshape(k, chunk)))
    return logp.reshape(-1)[:n].reshape(B, T), ent.reshape(-1)[:n].reshape(B, T)


def policy_logprobs(model, inputs, targets, *, chunk_size: int = 1024):
    """``(logp, entropy, router stats)`` of ``targets`` given ``inputs`` (``[B, T]``, each row starting at
    position 0; right padding changes nothing before it)."""
    h, stats = model.hidden_states(inputs)
    logp, ent = token_logprobs(h, model.lm_head.value, targets, chunk_size=chunk_size)
    return logp, ent, stats
