"""The differentiable Pallas lightning-attention op: padding, strategy choice and a ``jax.custom_vjp``.

The forward saves only its inputs ``(q, k, v, decay, h0)``, never per-chunk states; the backward
recomputes them. Gradients flow to q, k, v and the initial state, and the cotangent of the final
state is consumed (sequence parallelism and chunked training need it). ``decay`` is treated as a
constant: its cotangent is zero (MiniMax's rates are fixed slopes; use ``backend="reference"`` to
differentiate through the rates).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.lightning import common as cm

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static choices for one call. ``impl``: ``"triton_fused"``, ``"triton_chunked"``, ``"mosaic_gpu"``,
    ``"tpu"``. ``tuning``: sorted ``(name, value)`` pairs passed to the kernels."""

    impl: str
    block_size: int
    interpret: bool = False
    tuning: tuple = ()


def _kernels(impl):
    if impl == "triton_fused":
        from pallas_kernels.lightning import gpu_triton as m
        return m.fwd_fused, m.bwd_fused
    if impl == "triton_chunked":
        from pallas_kernels.lightning import gpu_triton as m
        from pallas_kernels.lightning import gpu_triton_split as s
        return s.fwd, m.bwd_chunked
    if impl == "mosaic_gpu":
        from pallas_kernels.lightning import gpu_mosaic as m
        return m.fwd, m.bwd
    if impl == "tpu":
        from pallas_kernels.lightning import tpu as m
        return m.fwd, m.bwd
    raise ValueError(f"lightning_attention: unknown kernel implementation {impl!r}")


def _split_tuning(tuning, prefix):
    """``fwd_BV=32`` applies to the forward only, ``bwd_BV=32`` to the backward, ``BV=32`` to both."""
    out = {}
    for key, val in tuning:
        if key.startswith("fwd_") or key.startswith("bwd_"):
            if key.startswith(prefix):
                out[key[len(prefix):]] = val
        else:
            out.setdefault(key, val)
    return out


@functools.lru_cache(maxsize=None)
def _make_op(cfg: KernelConfig, T: int):
    fwd_k, bwd_k = _kernels(cfg.impl)
    kw = dict(T=T, C=cfg.block_size, interpret=cfg.interpret)
    fkw = {**kw, **_split_tuning(cfg.tuning, "fwd_")}
    bkw = {**kw, **_split_tuning(cfg.tuning, "bwd_")}
    # ``fwd_block_size`` / ``bwd_block_size``: a chunk for one direction only (inputs are padded to a
    # multiple of both; both are powers of two on GPU).
    fkw["C"] = fkw.pop("block_size", fkw["C"])
    bkw["C"] = bkw.pop("block_size", bkw["C"])

    # ``seg``: None, or segment ids [B, T] of packed rows (only the Mosaic kernels take them).
    docs = lambda seg: {} if seg is None else {"segment_ids": seg}  # noqa: E731

    # The Mosaic forward can hand the backward its segments' entering states (tiny: P states per head).
    keeps_states = cfg.impl == "mosaic_gpu"

    @jax.custom_vjp
    def op(q, k, v, decay, h0, seg):
        return fwd_k(q, k, v, decay, h0, **fkw, **docs(seg))

    def op_fwd(q, k, v, decay, h0, seg):
        if keeps_states:
            o, ht, states = fwd_k(q, k, v, decay, h0, **fkw, **docs(seg), return_states=True)
        else:
            (o, ht), states = fwd_k(q, k, v, decay, h0, **fkw, **docs(seg)), None
        return (o, ht), (q, k, v, decay, h0, seg, states)

    def op_bwd(res, cts):
        q, k, v, decay, h0, seg, states = res
        do, dht = cts
        do = do.astype(q.dtype)
        extra = {"fwd_states": states} if keeps_states else {}
        dq, dk, dv, dh0 = bwd_k(q, k, v, decay, h0, do, dht.astype(F32), **bkw, **docs(seg), **extra)
        return dq, dk, dv, jnp.zeros_like(decay), dh0.astype(h0.dtype), None

    op.defvjp(op_fwd, op_bwd)
    return op



def lightning_pallas(q, k, v, decay, initial_state, cfg: KernelConfig, segment_ids=None):
    """Pads T to a multiple of the chunk (and, for the GPU kernels, head dims to a power of two >= 16,
    with zeros, which changes nothing), runs the custom_vjp op, slices the outputs back.
    ``segment_ids [B, T]`` (packed rows): only for calls that ``op.packed_rows_on_kernel`` lets through."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = max([cfg.block_size] + [v for k, v in cfg.tuning if k in ("fwd_block_size", "bwd_block_size")])
    Tp = -(-T // C) * C
    h0 = jnp.zeros((B, H, Dk, Dv), F32) if initial_state is None else initial_state.astype(F32)
    dt = q.dtype
    qp, kp, vp = (cm.pad_time(x.astype(dt), Tp) for x in (q, k, v))
    Dkp, Dvp = Dk, Dv
    if cfg.impl != "tpu":  # Triton blocks must be powers of two; the tiles must divide the head dims
        # (the Mosaic kernel takes head dims in multiples of 64)
        low = 64 if cfg.impl == "mosaic_gpu" else 16
        Dkp, Dvp = max(low, cm.pow2_at_least(Dk)), max(low, cm.pow2_at_least(Dv))
    if (Dkp, Dvp) != (Dk, Dv):
        padd = lambda x, d: jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, d - x.shape[-1]),))
        qp, kp, vp = padd(qp, Dkp), padd(kp, Dkp), padd(vp, Dvp)
        h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    o, ht = _make_op(cfg, T)(qp, kp, vp, decay.astype(F32), h0, seg)
    return o[:, :, :T, :Dv], ht[:, :, :Dk, :Dv]
