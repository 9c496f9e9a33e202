"""Context (sequence) parallelism over the mesh axis ``context``.

Lightning layers use LASP-2 (Sun et al. 2025): every context shard runs the lightning kernel on its
own chunk from a zero state, giving its local output and its chunk memory ``M_r`` (the final state);
one ``all_gather`` of the memories lets each shard form the state entering its chunk as a decayed
prefix sum, ``S_r = sum_{j<r} lam^{L(r-1-j)} M_j`` (plus the decayed initial state), and adds the
inter-chunk term ``o_t += (q_t lam^{t+1}) S_r``. Communication is one ``[B, H, Dk, Dv]`` state per
shard per layer, independent of the sequence length. Gradients are exact by autodiff: the transpose
of the ``all_gather`` is a reduce-scatter, which delivers each shard's ``dM_r`` to its local kernel
as the final-state cotangent (the LASP-2 backward).

Packed documents (``segment_ids``) are handled exactly: the prefix state reaches a token only if no
document starts between the chunk boundary and the token, and it crosses a whole chunk only if no
document starts inside it.

Softmax layers all-gather K and V (and the segment ids) over ``context`` and attend each shard's
queries at their global positions with the blockwise flash attention of ``pallas_kernels.attention``
(LASP-2H style; never an ``[L, T]`` score matrix). RoPE has already been applied with the tokens'
global positions.

Both functions take global arrays (the sequence dimension sharded over ``context``) and run under
``jax.shard_map`` on the mesh from ``jax.set_mesh``; with no mesh or ``context = 1`` they call the
single-device code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import attention as attention_kernels
from sharding.rules import current_mesh, logical_to_mesh_spec, mesh_axis_size

CONTEXT = "context"
_HI = lax.Precision.HIGHEST


def context_parallel_active(mesh=None) -> bool:
    mesh = current_mesh() if mesh is None else mesh
    return mesh is not None and mesh_axis_size(CONTEXT, mesh) > 1


def _entry(spec: P, i: int):
    return spec[i] if i < len(spec) else None


def _use_cp(T: int, mesh) -> bool:
    """Context parallel only when the mesh has ``context > 1`` and T splits evenly over it. Other lengths
    (decode steps, odd prompt lengths) run the single-program code, which GSPMD partitions; still exact."""
    return context_parallel_active(mesh) and T % mesh_axis_size(CONTEXT, mesh) == 0


# ------------------------------------------------------------------------------------- LASP-2
def lightning_attention(q, k, v, decay, *, initial_state=None, block_size=None, backend="auto",
                        segment_ids=None, mesh=None):
    """``pallas_kernels.lightning_attention`` that is context-parallel (LASP-2) when the mesh has a
    ``context`` axis > 1. Same arguments and results: q, k ``[B, H, T, Dk]``, v ``[B, H, T, Dv]``
    (T sharded over ``context``), decay ``[H]``; returns ``(o, final_state)``."""
    mesh = current_mesh() if mesh is None else mesh
    kernel = functools.partial(pallas_kernels.lightning_attention, block_size=block_size, backend=backend)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if not _use_cp(T, mesh):
        return kernel(q, k, v, decay, initial_state=initial_state, segment_ids=segment_ids)
    qspec = logical_to_mesh_spec(("activation_batch", "activation_heads", None, None), q.shape, mesh)
    bax, hax = _entry(qspec, 0), _entry(qspec, 1)
    x_spec = P(bax, hax, CONTEXT, None)
    s_spec = P(bax, hax, None, None)
    seg_spec = P(bax, CONTEXT)
    cp = mesh_axis_size(CONTEXT, mesh)
    has_seg = segment_ids is not None
    has_init = initial_state is not None
    if not has_init:
        initial_state = jnp.zeros((B, H, Dk, Dv), jnp.float32)
    if not has_seg:
        segment_ids = jnp.zeros((B, T), jnp.int32)

    def local(q, k, v, decay, s0, seg):
        o_loc, m_loc = kernel(q, k, v, decay, segment_ids=seg if has_seg else None)
        r = lax.axis_index(CONTEXT)
        L = q.shape[2]
        lam = decay.astype(jnp.float32)  # [H_loc]
        ms = lax.all_gather(m_loc, CONTEXT)  # [P, B, H, Dk, Dv]
        j = jnp.arange(cp)
        if has_seg:
            seg = seg.astype(jnp.int32)
            last = lax.all_gather(seg[:, -1], CONTEXT)  # [P, B]
            prev_last = jnp.where(r > 0, last[jnp.maximum(r - 1, 0)], seg[:, 0])
            first_reset = seg[:, :1] != prev_last[:, None]
            resets = jnp.concatenate([first_reset, seg[:, 1:] != seg[:, :-1]], axis=1)  # [B, L]
            alive = jnp.cumprod(1 - resets.astype(jnp.int32), axis=1).astype(jnp.float32)  # [B, L]
            passes = lax.all_gather(alive[:, -1], CONTEXT)  # [P, B]: state crosses shard p whole
            blocked = jnp.cumsum(1.0 - passes, axis=0)  # [P, B]
            # prod_{i=j+1}^{r-1} pass_i == 1  <=>  blocked[r-1] - blocked[j] == 0   (j < r)
            b_prev = blocked[jnp.maximum(r - 1, 0)]  # [B]
            open_j = (b_prev[None, :] - blocked) == 0  # [P, B]
            open_init = (b_prev == 0) | (r == 0)  # [B]: prod_{i=0}^{r-1} pass_i (empty for r = 0)
        else:
            alive = None
            open_j = jnp.ones((cp, 1), bool)
            open_init = jnp.ones((1,), bool)
        # weights of the gathered memories: lam^{L (r-1-j)} for j < r (exponent clamped before exp)
        e = jnp.maximum(r - 1 - j, 0).astype(jnp.float32)  # [P]
        w = jnp.exp(-lam[None, :] * (L * e)[:, None])  # [P, H]
        w = jnp.where((j < r)[:, None, None], w[:, None, :] * open_j[:, :, None], 0.0)  # [P, B|1, H]
        s_in = jnp.einsum("pbh,pbhkv->bhkv", w, ms, precision=_HI)
        w0 = jnp.exp(-lam * (L * r).astype(jnp.float32))  # [H]: initial state decayed over r shards
        s_in = s_in + (w0[None, :] * open_init[:, None])[:, :, None, None] * s0.astype(jnp.float32)
        t = jnp.arange(L, dtype=jnp.float32)
        a = jnp.exp(-lam[:, None] * (t[None, :] + 1.0))  # [H, L]
        qa = q.astype(jnp.float32) * a[None, :, :, None]
        if alive is not None:
            qa = qa * alive[:, None, :, None]
        o = o_loc.astype(jnp.float32) + jnp.einsum("bhtk,bhkv->bhtv", qa, s_in, precision=_HI)
        # the state leaving the last shard, computed identically on every shard
        last_r = cp - 1
        e_f = (last_r - j).astype(jnp.float32)
        if has_seg:
            open_f = ((blocked[last_r][None, :] - blocked) == 0)  # prod_{i=j+1}^{P-1} pass_i
            open_f0 = blocked[last_r] == 0
        else:
            open_f, open_f0 = jnp.ones((cp, 1), bool), jnp.ones((1,), bool)
        wf = jnp.exp(-lam[None, :] * (L * e_f)[:, None])[:, None, :] * open_f[:, :, None]
        s_fin = jnp.einsum("pbh,pbhkv->bhkv", wf, ms, precision=_HI)
        wf0 = jnp.exp(-lam * float(L * cp))
        s_fin = s_fin + (wf0[None, :] * open_f0[:, None])[:, :, None, None] * s0.astype(jnp.float32)
        return o.astype(q.dtype), s_fin

    f = jax.shard_map(local, mesh=mesh,
                      in_specs=(x_spec, x_spec, x_spec, P(hax), s_spec, seg_spec),
                      out_specs=(x_spec, s_spec), check_vma=False)
    return f(q, k, v, decay.astype(jnp.float32), initial_state, segment_ids)


# ------------------------------------------------------------------------------------- softmax
def attention_blocks(L: int) -> tuple[int, int]:
    """Query and key tiles of the blockwise attention of a shard of ``L`` queries: 512 for short shards;
    2048 from 16K queries on, so a 128K-query shard over 1M keys runs ~32K tile pairs instead of ~500K
    (XLA's loop has a fixed cost per iteration) while one tile's scores stay ``N * 2048^2 * 4`` bytes per
    row (256 MiB for 16 heads). Not tuned on hardware yet."""
    b = 512 if L < 16384 else 2048
    return b, b


def causal_attention(q, k, v, *, segment_ids=None, mesh=None, attention_fn=None):
    """Causal GQA attention ``[B, T, N, D] x [B, T, K, D]`` with T sharded over ``context``: each shard
    all-gathers K, V (and segment ids) and attends its ``L = T / context`` queries at their global
    positions ``r L + t`` with the blockwise flash attention of ``pallas_kernels.attention`` (``q_offset``):
    no shard ever holds more than one ``[block_q, block_k]`` tile of scores per head, so the ``[L, T]``
    (let alone ``[T, T]``) score matrix is never built, and the backward recomputes the tiles. The
    all-gather transposes to a reduce-scatter of the K/V gradients.

    ``attention_fn(q, k, v, segment_ids)`` is the single-device fallback (no context axis)."""
    mesh = current_mesh() if mesh is None else mesh
    B, T, N, D = q.shape
    if not _use_cp(T, mesh):
        if attention_fn is None:
            raise ValueError("causal_attention: no context-parallel mesh (or T not divisible by it) and no "
                             "attention_fn fallback")
        return attention_fn(q, k, v, segment_ids)
    qspec = logical_to_mesh_spec(("activation_batch", None, "activation_heads", None), q.shape, mesh)
    kspec = logical_to_mesh_spec(("activation_batch", None, "activation_kv_heads", None), k.shape, mesh)
    bax = _entry(qspec, 0)
    hq, hk = _entry(qspec, 2), _entry(kspec, 2)
    if hq != hk:  # GQA groups would not line up across head shards: keep heads whole in the core
        hq = hk = None
    q_spec, k_spec = P(bax, CONTEXT, hq, None), P(bax, CONTEXT, hk, None)
    has_seg = segment_ids is not None
    if not has_seg:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    block_q, block_k = attention_blocks(T // mesh_axis_size(CONTEXT, mesh))

    def local(q, k, v, seg):
        L = q.shape[1]
        r = lax.axis_index(CONTEXT)
        k_all = lax.all_gather(k, CONTEXT, axis=1, tiled=True)
        v_all = lax.all_gather(v, CONTEXT, axis=1, tiled=True)
        seg_all = lax.all_gather(seg, CONTEXT, axis=1, tiled=True)
        return attention_kernels.flash_attention(q, k_all, v_all, segment_ids=seg, kv_segment_ids=seg_all,
                                                 q_offset=r * L, causal=True, block_q=block_q, block_k=block_k)

    f = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, P(bax, CONTEXT)),
                      out_specs=q_spec, check_vma=False)
    return f(q, k, v, segment_ids)


__all__ = ["attention_blocks", "causal_attention", "context_parallel_active", "lightning_attention"]
