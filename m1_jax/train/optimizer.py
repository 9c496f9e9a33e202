"""AdamW with warmup + cosine or warmup-stable-decay schedules, global-norm clipping and a weight-decay
mask (no decay on norm weights and biases)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from m1_jax.config import require

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """``schedule``: ``cosine`` (linear warmup to ``learning_rate``, cosine to ``min_lr_ratio`` x peak at
    the last step), ``wsd`` (warmup, stable at the peak, then linear decay over the last
    ``decay_fraction`` of the steps to ``min_lr_ratio`` x peak) or ``constant`` (after warmup)."""

    learning_rate: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    z_loss_coef: float = 0.0

    def validate(self, total_steps: int) -> None:
        def need(cond, field, expected):
            require(cond, self, field, expected)

        need(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate", "a positive number")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "a number in [0, 1]")
        need(0.0 <= self.decay_fraction <= 1.0, "decay_fraction", "a number in [0, 1]")
        need(0.0 <= self.b1 < 1.0, "b1", "a number in [0, 1)")
        need(0.0 <= self.b2 < 1.0, "b2", "a number in [0, 1)")
        need(self.eps > 0, "eps", "a positive number")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.clip_norm is None or self.clip_norm > 0, "clip_norm", "None or a positive number")
        need(self.z_loss_coef >= 0, "z_loss_coef", "a number >= 0")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    w = cfg.warmup_steps
    warm = optax.linear_schedule(0.0, peak, max(w, 1)) if w > 0 else optax.constant_schedule(peak)
    rest = max(total_steps - w, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = int(round(cfg.decay_fraction * total_steps))
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay, 1))], [stable])
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warm, after], [w]) if w > 0 else after


_NO_DECAY = ("norm", "bias", "layernorm")


def decay_mask(params):
    """True for weights that get weight decay: everything except norm weights and biases (by name:
    any path component containing ``norm`` or ``bias``)."""

    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))).lower() for k in path]
        return not any(tag in n for n in names for tag in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    cfg.validate(total_steps)
    sched = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), sched


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
