"""Policy-gradient losses over per-token log-probabilities: CISPO (MiniMax-M1), PPO/GRPO clip, DAPO,
and the unified masked form of the M1 paper (Eq. 6-7).

All losses are token-level means over ``mask`` of the whole batch (the paper's normalisation), take
float32 log-probabilities ``[B, T]`` and advantages ``[B, T]`` or ``[B]`` (one per response), and
return a scalar whose gradient is the policy gradient. Log-ratios are clipped to +-20 before ``exp``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_LOG_RATIO_CLIP = 20.0


def _prepare(logp, old_logp, advantages, mask):
    if logp.shape != old_logp.shape:
        raise ValueError(f"logp {logp.shape} and old_logp {old_logp.shape} must have the same shape [B, T]")
    if mask.shape != logp.shape:
        raise ValueError(f"mask {mask.shape} must have logp's shape {logp.shape}")
    if advantages.ndim == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages {advantages.shape} must be [B] or [B, T] with B = {logp.shape[0]}")
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages {advantages.shape} must be [B] or [B, T] = {logp.shape}")
    logp = logp.astype(jnp.float32)
    ratio = jnp.exp(jnp.clip(logp - old_logp.astype(jnp.float32), -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP))
    mask = mask.astype(jnp.float32)
    return logp, ratio, jnp.broadcast_to(advantages.astype(jnp.float32), logp.shape), mask


def _token_mean(per_token, mask):
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cispo_loss(logp, old_logp, advantages, mask, *, eps_low: float, eps_high: float):
    """CISPO: ``-sum(sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp * mask) / sum(mask)``.

    The clipped importance weight is a constant (stop-gradient), so every token keeps a gradient
    ``w * A * grad(logp)``; nothing is dropped. The paper disables the lower bound (large ``eps_low``).
    """
    logp, ratio, adv, mask = _prepare(logp, old_logp, advantages, mask)
    w = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    return -_token_mean(w * adv * logp, mask)


def unified_loss(logp, old_logp, advantages, mask, *, eps_is_low: float, eps_is_high: float,
                 eps_mask_low: float, eps_mask_high: float):
    """The M1 paper's unified objective (Eq. 6-7): CISPO's clipped weight times PPO's trust-region
    mask ``M`` (0 where ``A > 0 and r > 1 + eps_mask_high`` or ``A < 0 and r < 1 - eps_mask_low``)."""
    logp, ratio, adv, mask = _prepare(logp, old_logp, advantages, mask)
    w = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - eps_is_low, 1.0 + eps_is_high))
    drop = ((adv > 0) & (ratio > 1.0 + eps_mask_high)) | ((adv < 0) & (ratio < 1.0 - eps_mask_low))
    keep = jax.lax.stop_gradient(1.0 - drop.astype(jnp.float32))
    return -_token_mean(w * adv * logp * keep, mask)


def ppo_clip_loss(logp, old_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2):
    """PPO / GRPO / DAPO clipped surrogate ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``, token-level
    mean (DAPO's normalisation; DAPO is ``eps_high = 0.28``)."""
    logp, ratio, adv, mask = _prepare(logp, old_logp, advantages, mask)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    return -_token_mean(surrogate, mask)


def clip_fraction(logp, old_logp, mask, *, eps_low: float, eps_high: float):
    """Fraction of masked tokens whose importance ratio falls outside ``[1 - eps_low, 1 + eps_high]``."""
    ratio = jnp.exp(jnp.clip(logp - old_logp, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP))
    outside = ((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)).astype(jnp.float32)
    return _token_mean(outside, mask.astype(jnp.float32))


POLICY_LOSSES: dict[str, Callable] = {"cispo": cispo_loss, "ppo": ppo_clip_loss, "unified": unified_loss}
