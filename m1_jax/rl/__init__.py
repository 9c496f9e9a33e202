"""Reinforcement-learning fine-tuning: CISPO and its relatives (losses by name), group advantages, verifiable
rewards, synthetic tasks, rollouts and the RL loop (``m1_jax.rl.loop.train_rl``; ``python train.py
--gin_file=configs/cispo_tiny.gin``). See docs/rl.md."""

from m1_jax.rl.advantages import group_advantages, informative_groups
from m1_jax.rl.losses import (LOSS_DEFAULTS, POLICY_LOSSES, cispo_loss, clip_fraction, dapo_loss, dropped_fraction,
                              grpo_loss, loss_bounds, policy_loss, ppo_clip_loss, unified_loss)

__all__ = ["LOSS_DEFAULTS", "POLICY_LOSSES", "cispo_loss", "clip_fraction", "dapo_loss", "dropped_fraction",
           "group_advantages", "grpo_loss", "informative_groups", "loss_bounds", "policy_loss", "ppo_clip_loss",
           "unified_loss"]
