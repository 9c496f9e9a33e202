"""Memory-light cross-entropy over a large vocabulary (MiniMax: 200,064), with optional z-loss.

``chunked_cross_entropy(h, w, targets, mask)`` computes the LM head and the softmax cross-entropy
``chunk_size`` tokens at a time, so float32 logits exist for one chunk only, never for the whole
batch. Under differentiation the forward pass also produces the gradients (for ``h`` and ``w``) chunk
by chunk (a ``custom_vjp``: the backward pass only scales them), so the head costs the same three
matmuls as an unfused head and nothing is recomputed.

The logits are accumulated in float32 (``preferred_element_type``); ``head_dtype`` is the dtype of the
matmul operands: ``"float32"`` (the MiniMax-M1 float32 LM head) or ``"bfloat16"`` (faster on GPU/TPU;
the softmax and the loss stay float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m1_jax.dtypes import as_dtype

HEAD_DTYPES = ("float32", "bfloat16")


def _chunks(x, n_chunks, chunk):
    return x.reshape((n_chunks, chunk) + x.shape[1:])


def _chunk_stats(hc, w, tc, mc, z_coef, dt, with_grad):
    logits = jnp.dot(hc.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)  # [C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    ce = jnp.sum((lse - tgt) * mc)
    z = jnp.sum(jnp.square(lse) * mc)
    if not with_grad:
        return ce, z, None, None
    # d/dlogits of (ce + z_coef * z) per token, times the mask.
    p = jnp.exp(logits - lse[:, None])
    scale = (1.0 + 2.0 * z_coef * lse) * mc
    g = p * scale[:, None] - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32) * mc[:, None]
    gd = g.astype(dt)
    dh = jnp.dot(gd, w.astype(dt).T, preferred_element_type=jnp.float32)
    dw = jnp.dot(hc.astype(dt).T, gd, preferred_element_type=jnp.float32)
    return ce, z, dh, dw


def _run(h, w, targets, mask, z_coef, chunk_size, head_dtype, with_grad):
    H = h.shape[-1]
    hf = h.reshape(-1, H)
    tf = targets.reshape(-1).astype(jnp.int32)
    mf = mask.reshape(-1).astype(jnp.float32)
    N = hf.shape[0]
    chunk = min(chunk_size, N)
    pad = (-N) % chunk
    if pad:
        hf = jnp.pad(hf, ((0, pad), (0, 0)))
        tf = jnp.pad(tf, (0, pad))
        mf = jnp.pad(mf, (0, pad))
    n = (N + pad) // chunk
    dt = as_dtype(head_dtype)
    xs = (_chunks(hf, n, chunk), _chunks(tf, n, chunk), _chunks(mf, n, chunk))

    def body(carry, x):
        ce_acc, z_acc, dw_acc = carry
        ce, z, dh, dw = _chunk_stats(*x[:1], w, *x[1:], z_coef, dt, with_grad)
        if with_grad:
            dw_acc = dw_acc + dw
        return (ce_acc + ce, z_acc + z, dw_acc), dh

    dw0 = jnp.zeros(w.shape, jnp.float32) if with_grad else jnp.zeros((), jnp.float32)
    (ce, z, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), dw0), xs)
    if not with_grad:
        return ce, z, None, None
    dh = dh.reshape(-1, H)[:N].reshape(h.shape)
    return ce, z, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sums(h, w, targets, mask, z_coef, chunk_size, head_dtype):
    """``(ce_sum + z_coef * z_sum, ce_sum, z_sum)``; only the first output is differentiable."""
    ce, z, _, _ = _run(h, w, targets, mask, z_coef, chunk_size, head_dtype, False)
    return ce + z_coef * z, ce, z


def _sums_fwd(h, w, targets, mask, z_coef, chunk_size, head_dtype):
    ce, z, dh, dw = _run(h, w, targets, mask, z_coef, chunk_size, head_dtype, True)
    return (ce + z_coef * z, ce, z), (dh.astype(h.dtype), dw.astype(w.dtype), targets, mask)


def _sums_bwd(z_coef, chunk_size, head_dtype, res, g):
    dh, dw, targets, mask = res
    g_obj = g[0]  # the ce / z outputs are metrics (the caller stops their gradients)
    tzero = jnp.zeros(targets.shape, jax.dtypes.float0) if jnp.issubdtype(targets.dtype, jnp.integer) else jnp.zeros_like(targets)
    return (dh * g_obj.astype(dh.dtype), dw * g_obj.astype(dw.dtype), tzero, jnp.zeros_like(mask))


_sums.defvjp(_sums_fwd, _sums_bwd)


def chunked_cross_entropy(h, w, targets, mask, *, z_loss_coef: float = 0.0, chunk_size: int = 2048,
                          head_dtype: str = "float32"):
    """Mean token cross-entropy (+ ``z_loss_coef`` * mean ``logsumexp^2``) of the LM head ``h @ w``.

    Args:
      h: ``[B, T, H]`` final hidden states; w: ``[H, V]`` LM head; targets ``[B, T]`` int;
      mask ``[B, T]`` float (1 = count the token; not differentiated).
    Returns:
      ``(loss, {"ce": mean cross-entropy, "z_loss": mean lse^2, "tokens": mask sum})``; ``loss`` is
      ``ce + z_loss_coef * z_loss`` and is what the gradient is of.
    """
    if head_dtype not in HEAD_DTYPES:
        raise ValueError(f"head_dtype = {head_dtype!r}: expected one of {HEAD_DTYPES}")
    mask = jax.lax.stop_gradient(mask.astype(jnp.float32))
    ntok = jnp.maximum(jnp.sum(mask), 1.0)
    obj, ce_sum, z_sum = _sums(h, w, targets.astype(jnp.int32), mask, float(z_loss_coef), int(chunk_size),
                               head_dtype)
    metrics = {"ce": jax.lax.stop_gradient(ce_sum) / ntok, "z_loss": jax.lax.stop_gradient(z_sum) / ntok,
               "tokens": ntok}
    return obj / ntok, metrics


def reference_cross_entropy(logits, targets, mask, z_loss_coef: float = 0.0):
    """Unchunked float32 reference (tests)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    ntok = jnp.maximum(jnp.sum(m), 1.0)
    return (jnp.sum((lse - tgt) * m) + z_loss_coef * jnp.sum(lse ** 2 * m)) / ntok
