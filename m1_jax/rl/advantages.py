"""Group-relative advantages (GRPO / CISPO): one scalar per response, normalised within its group."""

from __future__ import annotations

import jax.numpy as jnp


def group_advantages(rewards, group_size: int, *, eps: float = 1e-6, scale: bool = True):
    """``(R_i - mean_group(R)) / (std_group(R) + eps)`` with the unbiased (ddof=1) std, as verl and tunix.

    ``rewards [B]`` holds ``B / group_size`` consecutive groups of responses to the same prompt.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be [B] with B a multiple of group_size = {group_size}; got {rewards.shape}")
    if group_size < 2 and scale:
        raise ValueError("group_size must be at least 2 to normalise by the group's standard deviation")
    g = rewards.reshape(-1, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (g.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def informative_groups(rewards, group_size: int):
    """DAPO dynamic sampling: True for groups whose rewards are not all identical (they carry signal)."""
    g = jnp.asarray(rewards).reshape(-1, group_size)
    return jnp.any(g != g[:, :1], axis=1)
