"""One decoding step of lightning attention: ``S' = exp(-lam) S + k^T v``, ``o = q S'``.

Plain jnp under ``jax.jit`` with the state donated: XLA fuses it into one memory-bound pass over the
state, which is all a single token needs (each step reads and writes the whole float32 state).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _step(q, k, v, decay, state):
    if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"lightning_decode_step: q, k must be [B, H, Dk] and v [B, H, Dv]; "
                         f"got q{q.shape} k{k.shape} v{v.shape}")
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    if state.shape != (B, H, Dk, Dv):
        raise ValueError(f"lightning_decode_step: state must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}; got {state.shape}")
    if decay.shape != (H,):
        raise ValueError(f"lightning_decode_step: decay must be [H] = [{H}]; got {decay.shape}")
    gamma = jnp.exp(-decay.astype(F32))[None, :, None, None]
    hp = lax.Precision.HIGHEST
    new_state = gamma * state.astype(F32) + k.astype(F32)[..., :, None] * v.astype(F32)[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", q.astype(F32), new_state, precision=hp)
    return o.astype(q.dtype), new_state


lightning_decode_step = jax.jit(_step, donate_argnums=(4,))
lightning_decode_step.__doc__ = """One token: q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, decay ``[H]`` float32, state
``[B, H, Dk, Dv]`` float32 (donated: do not reuse it after the call). Returns ``(o [B, H, Dv] in q's
dtype, new_state float32)``. Use ``lightning_decode_step_nodonate`` inside your own jit."""

lightning_decode_step_nodonate = _step
