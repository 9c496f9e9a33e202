"""Text sampling for the end of a run (no KV cache: each new token re-runs the causal forward over a
fixed-length buffer, fine for the short samples a training run prints)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sample_tokens(graphdef, params, prompt_ids, num_tokens: int, *, temperature: float = 0.8, seed: int = 0):
    """``prompt_ids`` (1-D ints) + ``num_tokens`` sampled ids (temperature 0 = greedy)."""
    prompt = jnp.asarray(prompt_ids, jnp.int32)
    P = int(prompt.shape[0])
    if P == 0:
        raise ValueError("sample: the prompt must hold at least one token")
    L = P + num_tokens
    buf = jnp.zeros((1, L), jnp.int32).at[0, :P].set(prompt)

    @jax.jit
    def run(params, buf, key):
        model = nnx.merge(graphdef, params)

        def body(i, carry):
            buf, key = carry
            h, _ = model.hidden_states(buf)
            hi = jax.lax.dynamic_slice_in_dim(h, i - 1, 1, axis=1)
            logits = model.logits(hi)[0, 0]
            key, sub = jax.random.split(key)
            if temperature > 0:
                tok = jax.random.categorical(sub, logits / temperature)
            else:
                tok = jnp.argmax(logits)
            return buf.at[0, i].set(tok.astype(jnp.int32)), key

        buf, _ = jax.lax.fori_loop(P, L, body, (buf, key))
        return buf

    out = run(params, buf, jax.random.key(seed))
    return [int(t) for t in jax.device_get(out)[0]]
