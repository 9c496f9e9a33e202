"""Chunk math shared by every lightning-attention kernel (plain jnp on arrays, usable inside Pallas).

One chunk of C rows (local index i, j; ``m`` real rows, the rest zero padding), rate ``lam``::

    D_ij = exp(-lam (i - j)) [i >= j]     a_i = exp(-lam (i + 1))
    b_j  = exp(-lam (m - 1 - j)) [j < m]  g   = exp(-lam m)

    forward:   O = a * (Q S) + ((Q K^T) * D) V              S' = g S + (b * K)^T V
    backward:  dP = (dO V^T) * D,  P = (Q K^T) * D            (dS is the cotangent of S')
               dQ = dP K + a * (dO S^T)      dK = dP^T Q + b * (V dS^T)
               dV = P^T dO + b * (K dS)      dS_prev = g dS + (a * Q)^T dO

Exponents are masked before ``exp`` so nothing overflows. Matmul operands are in the input dtype
(bf16 operands for bf16 inputs, the state cast to it), accumulation is float32; float32 inputs use
full-precision matmuls (``precision=HIGHEST``, no TF32).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def precision_for(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def mm(a, b, *, ta=False, tb=False, precision=None):
    """2-D matmul with float32 accumulation; ``ta``/``tb`` transpose an operand (fused into the dot)."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def iota_row_col(C, *, tpu=False):
    """Row index ``[C, 1]`` and column index ``[1, C]`` (int32) in a form each backend lowers."""
    if tpu:
        return (lax.broadcasted_iota(jnp.int32, (C, 1), 0), lax.broadcasted_iota(jnp.int32, (1, C), 1))
    r = jnp.arange(C, dtype=jnp.int32)
    return r[:, None], r[None, :]


def intra_decay(lam, row, col):
    """Masked decay matrix ``D [C, C]`` and query decay ``a [C, 1]``."""
    rowf = row.astype(F32)
    diff = rowf - col.astype(F32)
    D = jnp.exp(jnp.where(row >= col, -lam * diff, -jnp.inf))
    a = jnp.exp(-lam * (rowf + 1.0))
    return D, a


def state_decay(lam, row, m):
    """Key decay ``b [C, 1]`` (zero on padded rows) and chunk decay ``g`` for a chunk of ``m`` real rows."""
    bexp = (m - 1 - row).astype(F32)
    b = jnp.exp(jnp.where(bexp >= 0.0, -lam * bexp, -jnp.inf))
    g = jnp.exp(-lam * jnp.asarray(m).astype(F32))
    return b, g


def real_rows(n, C, T):
    """Real rows in chunk ``n`` of a sequence of T tokens (the last chunk may be short; chunks wholly in
    the padding have 0 rows: they neither decay nor add to the state)."""
    return jnp.clip(T - n * C, 0, C)


def fwd_out(q, k, v, S, D, a, prec):
    """Output of one chunk from the entering state S (float32)."""
    cd = q.dtype
    s = mm(q, k, tb=True, precision=prec) * D
    return mm(s.astype(cd), v, precision=prec) + a * mm(q, S.astype(cd), precision=prec)


def intra_out(q, k, v, D, prec):
    s = mm(q, k, tb=True, precision=prec) * D
    return mm(s.astype(q.dtype), v, precision=prec)


def state_update(k, v, S, b, g, prec):
    """S' = g S + (b K)^T V."""
    kb = (k.astype(F32) * b).astype(k.dtype)
    return g * S + mm(kb, v, ta=True, precision=prec)


def dstate_update(q, do, dS, a, g, prec):
    """dS_prev = g dS + (a Q)^T dO."""
    qa = (q.astype(F32) * a).astype(q.dtype)
    return g * dS + mm(qa, do, ta=True, precision=prec)


def bwd_dq(do, v, k, S, D, a, prec):
    """dQ = ((dO V^T) * D) K + a (dO S^T); S is the state entering the chunk."""
    cd = do.dtype
    dP = mm(do, v, tb=True, precision=prec) * D
    return mm(dP.astype(cd), k, precision=prec) + a * mm(do, S.astype(cd), tb=True, precision=prec)


def bwd_dk(do, v, q, dS, D, b, prec):
    """dK = ((dO V^T) * D)^T Q + b (V dS^T); dS is the cotangent of the state leaving the chunk."""
    cd = do.dtype
    dP = mm(do, v, tb=True, precision=prec) * D
    return mm(dP.astype(cd), q, ta=True, precision=prec) + b * mm(v, dS.astype(cd), tb=True, precision=prec)


def bwd_dv(q, k, do, dS, D, b, prec):
    """dV = ((Q K^T) * D)^T dO + b (K dS)."""
    cd = q.dtype
    P = mm(q, k, tb=True, precision=prec) * D
    return mm(P.astype(cd), do, ta=True, precision=prec) + b * mm(k, dS.astype(cd), precision=prec)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def segment_join(M, lam, s_in, *, T, C, L, reverse=False, reset=None):
    """States entering each of P segments of L chunks ``E [B, H, P, Dy, Dz]`` from the segments' local
    states ``M`` (walks from zero) and the state entering the whole walk ``s_in`` (h0, or dht for a
    reverse walk). ``reset [B, P]`` (packed documents): a document starts in segment p, so no state
    crosses it.

    With R_p = min(T, p L C) the real rows before segment p (trailing segments may be short or empty):
    forward  E_p = sum_{j<p} exp(-lam (R_p - R_{j+1})) M_j + exp(-lam R_p) h0,
    reverse  E_p = sum_{j>p} exp(-lam (R_j - R_{p+1})) M_j + exp(-lam (T - R_{p+1})) dht.
    """
    P = M.shape[2]
    lam = lam.astype(F32)[:, None, None]
    R = jnp.minimum(jnp.arange(P + 1, dtype=F32) * float(L * C), float(T))
    p = jnp.arange(P)
    if not reverse:
        expo, valid = R[:P, None] - R[None, 1:], p[:, None] > p[None, :]
        w0 = jnp.exp(-lam[:, :, 0] * R[None, :P])
    else:
        expo, valid = R[None, :P] - R[1:, None], p[None, :] > p[:, None]
        w0 = jnp.exp(-lam[:, :, 0] * (float(T) - R[None, 1:]))
    W = jnp.where(valid[None], jnp.exp(-lam * jnp.maximum(expo, 0.0)[None]), 0.0)
    if reset is None:
        E = jnp.einsum("hpj,bhjyz->bhpyz", W, M, precision=lax.Precision.HIGHEST)
        return E + w0[None, :, :, None, None] * s_in[:, :, None]
    # Packed documents: a state crosses only segments in which no document starts.
    cnt = jnp.cumsum(reset.astype(jnp.int32), axis=1)  # [B, P], resets in segments 0..p
    cnt0 = jnp.concatenate([jnp.zeros_like(cnt[:, :1]), cnt], axis=1)  # [B, P + 1], resets before p
    if not reverse:  # j < p crosses j+1 .. p-1; h0 crosses 0 .. p-1
        clear = cnt0[:, :P][:, :, None] == cnt0[:, 1:][:, None, :]  # [B, p, j]: cnt0[p] == cnt0[j + 1]
        clear0 = cnt0[:, :P] == 0
    else:  # j > p crosses p+1 .. j-1; dht crosses p+1 .. P-1
        clear = cnt0[:, 1:][:, :, None] == cnt0[:, :P][:, None, :]  # [B, p, j]: cnt0[p + 1] == cnt0[j]
        clear0 = cnt[:, -1:] == cnt0[:, 1:]
    Wb = W[None] * clear[:, None].astype(F32)  # [B, H, P, P]
    E = jnp.einsum("bhpj,bhjyz->bhpyz", Wb, M, precision=lax.Precision.HIGHEST)
    return E + (w0[None] * clear0[:, None].astype(F32))[..., None, None] * s_in[:, :, None]


def pad_time(x, Tp):
    T = x.shape[2]
    if Tp == T:
        return x
    return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
