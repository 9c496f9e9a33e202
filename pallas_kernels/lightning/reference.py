"""Reference lightning attention: a token recurrence (ground truth) and a chunked jnp form (fast).

Per batch row and head, with rate ``lam = decay[h]`` and float32 state ``S [Dk, Dv]``::

    S_t = exp(-lam) * S_{t-1} + k_t^T v_t        (S_{-1} = initial_state or 0)
    o_t = q_t S_t                                  (token t included with weight 1)

Optional ``segment_ids [B, T]`` (packed documents) restart the state at every document start:
``S_t = [seg_t == seg_{t-1}] * exp(-lam) * S_{t-1} + k_t^T v_t``. The initial state belongs to the
first token's document. Segments must be contiguous runs (ids change only at document starts).

The chunked form (Lightning Attention-2) splits T into blocks of C tokens. With local index i, j
and m real rows in the block (the last block may be short)::

    O     = diag(a) Q S_in + ((Q K^T) * D) V,     a_i = exp(-lam (i+1)),  D_ij = exp(-lam (i-j)) [i>=j]
    S_out = exp(-lam m) S_in + (diag(b) K)^T V,   b_j = exp(-lam (m-1-j))

Decay exponents are masked before ``exp`` so nothing overflows. States and accumulation are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _dot_precision(dtype) -> lax.Precision:
    # f32 inputs get true f32 matmuls (no TF32 / bf16 passes) so the reference stays a reference.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def lightning_attention_recurrent(q, k, v, decay, initial_state=None, segment_ids=None):
    """Token-by-token ``lax.scan`` recurrence. The ground truth in tests; O(T) sequential steps.

    Computes in float32 (float64 if the inputs are float64 and x64 is enabled).
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    cdt = jnp.promote_types(q.dtype, _F32)
    gamma = jnp.exp(-decay.astype(cdt))[None, :, None, None]  # [1, H, 1, 1]
    s0 = (jnp.zeros((B, H, Dk, Dv), cdt) if initial_state is None else initial_state.astype(cdt))
    if segment_ids is None:
        keep = jnp.ones((T, B), cdt)
    else:
        seg = segment_ids.astype(jnp.int32)
        prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
        keep = (seg == prev).astype(cdt).T  # [T, B]
    hp = lax.Precision.HIGHEST

    def step(S, xs):
        qt, kt, vt, kp = xs  # [B, H, D], keep [B]
        S = (gamma * kp[:, None, None, None]) * S + jnp.einsum("bhk,bhv->bhkv", kt, vt, precision=hp)
        o = jnp.einsum("bhk,bhkv->bhv", qt, S, precision=hp)
        return S, o

    xs = (jnp.moveaxis(q.astype(cdt), 2, 0), jnp.moveaxis(k.astype(cdt), 2, 0),
          jnp.moveaxis(v.astype(cdt), 2, 0), keep)
    S, o = lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 2).astype(q.dtype), S


def lightning_attention_chunked(q, k, v, decay, initial_state=None, block_size=256, segment_ids=None):
    """Blockwise (intra-block masked decay + inter-block state) lightning attention in plain jnp.

    Returns ``(o, final_state)``; ``o`` has q's dtype, the state is float32. Any T: the last block may be
    short, and its decays use its real length so the final state is exact.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = int(min(block_size, T))
    N = -(-T // C)
    pad = N * C - T
    cdt = jnp.promote_types(q.dtype, _F32)
    prec = _dot_precision(q.dtype)
    lam = decay.astype(cdt)[:, None, None]  # [H, 1, 1]

    def blocks(x):
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x
        return x.reshape(B, H, N, C, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    i = jnp.arange(C)
    m = jnp.minimum(C, T - jnp.arange(N) * C).astype(cdt)  # real rows per block [N]
    diff = (i[:, None] - i[None, :]).astype(cdt)
    causal = i[:, None] >= i[None, :]
    D = jnp.exp(jnp.where(causal[None], -lam * diff[None], -jnp.inf))  # [H, C, C]
    a = jnp.exp(-lam * (i + 1).astype(cdt))  # [H, 1, C] query decay
    bexp = m[:, None] - 1 - i[None, :].astype(cdt)  # [N, C]; negative on padded rows
    b = jnp.exp(jnp.where(bexp[None] >= 0, -lam[:, :, :1] * bexp[None], -jnp.inf))  # [H, N, C]
    g = jnp.exp(-lam[:, 0, 0][:, None] * m[None, :])  # [H, N] block decay

    # Broadcastable decay factors [B?, H, N, C(, C)]; segment ids turn them into per-row masks.
    Dm = D[None, :, None]  # [1, H, 1, C, C]
    am = jnp.broadcast_to(a[:, 0][None, :, None, :], (1, H, N, C))
    bm = b[None]  # [1, H, N, C]
    gm = g[None]  # [1, H, N]
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        segp = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge") if pad else seg
        sb = segp.reshape(B, N, C)
        last_real = (m.astype(jnp.int32) - 1)  # [N]
        seg_last = jnp.take_along_axis(sb, last_real[None, :, None], axis=2)[..., 0]  # [B, N]
        seg_in = jnp.concatenate([seg[:, :1], seg_last[:, :-1]], axis=1)  # segment of the entering state
        same = (sb[:, :, :, None] == sb[:, :, None, :]).astype(cdt)  # [B, N, C, C]
        Dm = Dm * same[:, None]
        am = am * (sb == seg_in[:, :, None]).astype(cdt)[:, None]
        bm = bm * (sb == seg_last[:, :, None]).astype(cdt)[:, None]
        gm = gm * (seg_in == seg_last).astype(cdt)[:, None]

    # Intra-block: ((Q K^T) * D) V, parallel over blocks.
    scores = jnp.einsum("bhncd,bhnsd->bhncs", qb, kb, precision=prec, preferred_element_type=cdt)
    scores = scores * Dm
    o_intra = jnp.einsum("bhncs,bhnse->bhnce", scores.astype(vb.dtype) if vb.dtype != cdt else scores, vb,
                         precision=prec, preferred_element_type=cdt)
    # Per-block memories M_n = (diag(b) K)^T V, then a sequential scan over blocks for the states.
    kd = (kb.astype(cdt) * bm[..., None]).astype(kb.dtype)
    mem = jnp.einsum("bhnsd,bhnse->bhnde", kd, vb, precision=prec, preferred_element_type=cdt)
    s0 = jnp.zeros((B, H, Dk, Dv), cdt) if initial_state is None else initial_state.astype(cdt)
    gmb = jnp.broadcast_to(gm, (B, H, N))

    def carry(S, xs):
        M, gn = xs
        return gn[..., None, None] * S + M, S  # emit the state entering the block

    S_final, S_in = lax.scan(carry, s0, (jnp.moveaxis(mem, 2, 0), jnp.moveaxis(gmb, 2, 0)))
    S_in = jnp.moveaxis(S_in, 0, 2)  # [B, H, N, Dk, Dv]
    qa = qb.astype(cdt) * am[..., None]
    o_inter = jnp.einsum("bhncd,bhnde->bhnce", qa, S_in, precision=lax.Precision.HIGHEST,
                         preferred_element_type=cdt)
    o = (o_intra + o_inter).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.astype(q.dtype), S_final


def lightning_decode_reference(q, k, v, decay, state):
    """One token of the recurrence: q, k, v ``[B, H, D]``; returns ``(o [B, H, Dv], new_state)``."""
    gamma = jnp.exp(-decay.astype(_F32))[None, :, None, None]
    S = gamma * state.astype(_F32) + jnp.einsum("bhk,bhv->bhkv", k.astype(_F32), v.astype(_F32),
                                                precision=lax.Precision.HIGHEST)
    o = jnp.einsum("bhk,bhkv->bhv", q.astype(_F32), S, precision=lax.Precision.HIGHEST)
    return o.astype(q.dtype), S
