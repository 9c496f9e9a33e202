"""Load a Hugging Face / original MiniMax checkpoint folder into ``MiniMaxForCausalLM``."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.config import ModelConfig
from m1_jax.convert.mapping import DERIVED_KEY, hf_key_map, to_ours
from m1_jax.model import MiniMaxForCausalLM


class CheckpointError(ValueError):
    """A checkpoint folder does not match what the config and the key mapping expect."""


def read_hf_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a HF checkpoint folder)")
    with open(cfg_path) as f:
        return json.load(f)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def abstract_model(config: ModelConfig):
    """The model's graph and parameter shapes without allocating anything."""
    return nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)))


def load_hf_checkpoint(path: str, *, dtype: str | None = None, mesh=None):
    """Read ``config.json`` and the safetensors files of a HF MiniMax checkpoint; return ``(config, model)``.

    HF's derived decay buffers are ignored. ``dtype`` overrides the parameter dtype (default: the
    checkpoint's). The router stays float32.
    """
    from safetensors import safe_open

    hf_cfg = read_hf_config(path)
    overrides = {} if dtype is None else {"param_dtype": dtype, "dtype": dtype}
    config = ModelConfig.from_hf(hf_cfg, **overrides)
    key_map = hf_key_map(config)
    graphdef, abstract_state = nnx.split(abstract_model(config))
    flat = dict(nnx.to_flat_state(abstract_state))
    buffers = {path_: np.zeros(var.value.shape, np.float32) for path_, var in flat.items()}
    seen = set()
    for file in safetensors_files(path):
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                if DERIVED_KEY.match(key):
                    continue
                if key not in key_map:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} (not part of a MiniMax checkpoint "
                                          f"with this config.json)")
                t = key_map[key]
                w = f.get_tensor(key)
                if tuple(w.shape) != t.hf_shape:
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(w.shape)}; expected {t.hf_shape}")
                buffers[t.path][t.index] = to_ours(t.kind, np.asarray(w, np.float32), config)
                seen.add(key)
    missing = sorted(set(key_map) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    for path_, var in flat.items():
        var.value = jnp.asarray(buffers[path_], dtype=var.value.dtype)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if mesh is not None:
        raise NotImplementedError("load_hf_checkpoint(mesh=...) arrives with the streaming converter")
    return config, model
