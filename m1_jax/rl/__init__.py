"""Reinforcement-learning objectives: CISPO and its relatives, group advantages."""

from m1_jax.rl.advantages import group_advantages, informative_groups
from m1_jax.rl.losses import POLICY_LOSSES, cispo_loss, clip_fraction, ppo_clip_loss, unified_loss

__all__ = ["POLICY_LOSSES", "cispo_loss", "clip_fraction", "group_advantages", "informative_groups",
           "ppo_clip_loss", "unified_loss"]
