"""Synthetic M1-shaped checkpoints written tensor by tensor (no model in memory), and an RSS probe."""

from __future__ import annotations

import json
import os

import numpy as np

from m1_jax.config import ModelConfig, m1_layer_types
from m1_jax.convert.hf_export import hf_configs, hf_entries
from m1_jax.convert.safetensors_io import ST_TO_NP, ShardedWriter


def mid_config(**overrides) -> ModelConfig:
    """A mid-size M1-shaped config: 7+1 blocks, 8 experts top-2, GQA, partial rope, bf16 (~0.45 GB)."""
    kw = dict(vocab_size=4096, hidden_size=384, num_hidden_layers=16, num_attention_heads=4, head_dim=64,
              num_key_value_heads=2, intermediate_size=768, num_local_experts=8, num_experts_per_tok=2,
              rotary_dim=32, layer_types=m1_layer_types(16), block_size=64, param_dtype="bfloat16",
              dtype="bfloat16", full_attn_alpha_factor=2.0, linear_attn_alpha_factor=2.0, mlp_alpha_factor=2.0)
    kw.update(overrides)
    return ModelConfig(**kw)


def write_synthetic_hf(config: ModelConfig, path: str, *, max_shard_size="24MB", router_dtype="float32",
                       original_config: bool = True, seed: int = 0) -> int:
    """Write a random checkpoint of ``config`` in the released layout (bf16, fp32 router, remote-code
    config.json); return its size in bytes."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = hf_entries(config, config.param_dtype, router_dtype)
    writer = ShardedWriter(path, entries, max_shard_size)
    for key, shape, st in writer:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= 0.02
        writer.write(key, w.astype(ST_TO_NP[st]))
    writer.finish()
    builtin, original = hf_configs(config, config.param_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(original if original_config else builtin, f)
    return writer.total_size
