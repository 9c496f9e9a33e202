"""Policy-gradient losses over per-token log-probabilities: CISPO (MiniMax-M1), PPO/GRPO clip, DAPO,
and the unified masked form of the M1 paper (Eq. 6-7).

The losses take float32 log-probabilities ``[B, T]`` and advantages ``[B, T]`` or ``[B]`` (one per
response) and return a scalar whose gradient is the policy gradient. All but ``grpo_loss`` are
token-level means over ``mask`` of the whole batch (the M1 paper's and DAPO's normalisation);
``grpo_loss`` averages each response over its own tokens first, then over responses (DeepSeekMath's
GRPO). Log-ratios are clipped to +-20 before ``exp``.

By name (:data:`LOSS_DEFAULTS`, :func:`policy_loss`), so that a comparison is one config switch:

==========  =====================================  ===========================  ==========================
name        weight on grad log pi                  default (eps_low, eps_high)  normalisation
==========  =====================================  ===========================  ==========================
``cispo``   sg(clip(r, 1 - eps_low, 1 + eps_high))  (off, 0.28)                 token mean over the batch
``dapo``    r inside the trust region, else 0      (0.2, 0.28) clip-higher      token mean over the batch
``grpo``    r inside the trust region, else 0      (0.2, 0.2)                   per response, then mean
``ppo``     r inside the trust region, else 0      (0.2, 0.2)                   token mean over the batch
==========  =====================================  ===========================  ==========================

No KL term (the M1 paper and DAPO use none; GRPO's KL to a reference model is not implemented).
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


def _bound(eps):
    return jnp.inf if eps is None else eps


def cispo_loss(logp, old_logp, advantages, mask, *, eps_low: float | None, eps_high: float):
    """CISPO: ``-sum(sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp * mask) / sum(mask)``.

    The clipped importance weight is a constant (stop-gradient), so every token keeps a gradient
    ``w * A * grad(logp)``; nothing is dropped. The paper disables the lower bound (large ``eps_low``;
    ``None`` = no lower bound).
    """
    logp, ratio, adv, mask = _prepare(logp, old_logp, advantages, mask)
    w = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - _bound(eps_low), 1.0 + eps_high))
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


def _surrogate(ratio, adv, eps_low, eps_high):
    return jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)


def ppo_clip_loss(logp, old_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2):
    """PPO / GRPO / DAPO clipped surrogate ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``, token-level
    mean (DAPO's normalisation; DAPO is ``eps_high = 0.28``)."""
    logp, ratio, adv, mask = _prepare(logp, old_logp, advantages, mask)
    return -_token_mean(_surrogate(ratio, adv, eps_low, eps_high), mask)


def dapo_loss(logp, old_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.28):
    """DAPO: the clipped surrogate with clip-higher (``eps_high > eps_low``), token-level mean."""
    return ppo_clip_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high)


def grpo_loss(logp, old_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2):
    """GRPO (DeepSeekMath, without the KL term): the clipped surrogate averaged over each response's own
    tokens, then over the responses that have any."""
    logp, ratio, adv, mask = _prepare(logp, old_logp, advantages, mask)
    per_seq = jnp.sum(_surrogate(ratio, adv, eps_low, eps_high) * mask, axis=1)
    n = jnp.sum(mask, axis=1)
    has = (n > 0).astype(jnp.float32)
    return -jnp.sum(per_seq / jnp.maximum(n, 1.0) * has) / jnp.maximum(jnp.sum(has), 1.0)


def clip_fraction(logp, old_logp, mask, *, eps_low: float | None, eps_high: float):
    """Fraction of masked tokens whose importance ratio falls outside ``[1 - eps_low, 1 + eps_high]``
    (``eps_low = None``: no lower bound)."""
    ratio = jnp.exp(jnp.clip(logp - old_logp, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP))
    outside = ((ratio < 1.0 - _bound(eps_low)) | (ratio > 1.0 + eps_high)).astype(jnp.float32)
    return _token_mean(outside, mask.astype(jnp.float32))


def dropped_fraction(logp, old_logp, advantages, mask, *, eps_low: float | None, eps_high: float):
    """Fraction of masked tokens that PPO-style clipping gives no gradient (``A > 0 and r > 1 + eps_high``
    or ``A < 0 and r < 1 - eps_low``); CISPO keeps their gradient."""
    logp, ratio, adv, mask = _prepare(logp, old_logp, advantages, mask)
    drop = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - _bound(eps_low)))
    return _token_mean(drop.astype(jnp.float32), mask)


POLICY_LOSSES: dict[str, Callable] = {"cispo": cispo_loss, "dapo": dapo_loss, "grpo": grpo_loss, "ppo": ppo_clip_loss,
                                      "unified": unified_loss}
# (eps_low, eps_high) of each loss by name; None = no lower bound on CISPO's importance weight.
LOSS_DEFAULTS: dict[str, tuple[float | None, float]] = {"cispo": (None, 0.28), "dapo": (0.2, 0.28), "grpo": (0.2, 0.2),
                                                        "ppo": (0.2, 0.2)}


def loss_bounds(name: str, eps_low: float | None = None, eps_high: float | None = None) -> tuple[float | None, float]:
    """The ``(eps_low, eps_high)`` of loss ``name``: its defaults, overridden by the values given."""
    if name not in LOSS_DEFAULTS:
        raise ValueError(f"loss {name!r}: expected one of {sorted(LOSS_DEFAULTS)}")
    lo, hi = LOSS_DEFAULTS[name]
    return (lo if eps_low is None else eps_low), (hi if eps_high is None else eps_high)


def policy_loss(name: str, logp, old_logp, advantages, mask, *, eps_low: float | None = None,
                eps_high: float | None = None):
    """The loss called ``name`` (``cispo``, ``dapo``, ``grpo``, ``ppo``) with its default bounds unless given."""
    lo, hi = loss_bounds(name, eps_low, eps_high)
    if name == "cispo":
        return cispo_loss(logp, old_logp, advantages, mask, eps_low=lo, eps_high=hi)
    return POLICY_LOSSES[name](logp, old_logp, advantages, mask, eps_low=_bound(lo), eps_high=hi)
