"""Flax NNX modules of the MiniMax-M1 architecture."""

from m1_jax.model.abstract import abstract_model
from m1_jax.model.decoder import DecoderBlock, DecoderLayer, MiniMaxForCausalLM, positions_from_segments
from m1_jax.model.lightning import LightningAttention, alibi_slopes, lightning_decay
from m1_jax.model.moe import MoE, RouterStats, load_balancing_loss
from m1_jax.model.softmax_attention import SoftmaxAttention

__all__ = [
    "DecoderBlock", "DecoderLayer", "LightningAttention", "MiniMaxForCausalLM", "MoE", "RouterStats",
    "SoftmaxAttention", "abstract_model", "alibi_slopes", "lightning_decay", "load_balancing_loss",
    "positions_from_segments",
]
