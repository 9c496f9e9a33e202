"""Write our parameters as a Hugging Face checkpoint folder, one tensor at a time.

The folder has ``model-0000i-of-0000n.safetensors`` files (the original per-expert
``block_sparse_moe.experts.{e}.w1/w2/w3`` names, as transformers' ``save_pretrained`` writes them),
``model.safetensors.index.json``, ``config.json`` in transformers' built-in form (``MiniMaxForCausalLM``,
model_type ``minimax``) and ``config.original.json`` in the remote-code form (``attn_type_list``,
``rotary_dim``). transformers' built-in MiniMax ignores ``rotary_dim`` and rotates the whole head, so a
model with ``rotary_dim < head_dim`` (the released checkpoints: 64 of 128) is exact there only under
code that honours ``rotary_dim`` (the remote code, vLLM, this package).
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from m1_jax.config import ModelConfig
from m1_jax.convert.atomic import staged_folder
from m1_jax.convert.errors import CheckpointError
from m1_jax.convert.mapping import Target, hf_key_map, is_router, to_hf
from m1_jax.convert.progress import Progress
from m1_jax.convert.safetensors_io import NAME_TO_ST, ST_TO_NP, ShardedWriter

ORIGINAL_CONFIG_NAME = "config.original.json"


def export_order(key_map: dict[str, Target]) -> list[str]:
    """Embedding, then layer by layer, then the final norm and the LM head."""
    head = ["model.embed_tokens.weight"]
    tail = ["model.norm.weight", "lm_head.weight"]
    return head + [k for k in key_map if k not in head and k not in tail] + tail


def hf_entries(config: ModelConfig, dtype: str, router_dtype: str) -> list[tuple[str, tuple, str]]:
    """``(key, shape, safetensors dtype)`` of every tensor of the export, in file order."""
    key_map = hf_key_map(config)
    return [(k, key_map[k].hf_shape, NAME_TO_ST[router_dtype if is_router(k) else dtype])
            for k in export_order(key_map)]


def hf_configs(config: ModelConfig, dtype: str) -> tuple[dict, dict]:
    builtin = config.to_hf()
    original = config.to_hf_original()
    for d in (builtin, original):
        d["torch_dtype"] = dtype
    builtin["dtype"] = dtype  # the transformers >= 5 name (it still reads torch_dtype)
    # The remote code hard-codes BLOCK = 256 and ignores this field; keep it so the file round-trips.
    original.setdefault("block_size", config.block_size)
    return builtin, original


def write_hf_folder(config: ModelConfig, get: Callable[[str], np.ndarray], dst: str, *, dtype: str,
                    router_dtype: str = "float32", max_shard_size: int | str = "5GB", overwrite: bool = False,
                    progress: bool = False) -> str:
    """Write a HF folder whose tensor ``key`` is ``get(key)`` (HF layout), cast to ``dtype`` (the router to
    ``router_dtype``). Output goes to a temporary folder moved to ``dst`` only when complete."""
    for name, v in (("dtype", dtype), ("router_dtype", router_dtype)):
        if v not in NAME_TO_ST:
            raise ValueError(f"{name} = {v!r}: expected one of {sorted(NAME_TO_ST)}")
    entries = hf_entries(config, dtype, router_dtype)
    builtin, original = hf_configs(config, dtype)
    with staged_folder(dst, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_size)
        try:
            with Progress(writer.total_size, len(entries), f"export {os.path.basename(os.path.normpath(dst))}",
                          enabled=progress) as bar:
                for key, shape, st in writer:
                    w = np.asarray(get(key))
                    if tuple(w.shape) != shape:
                        raise CheckpointError(f"tensor {key!r}: our parameter gives shape {tuple(w.shape)}; "
                                              f"expected {shape}")
                    writer.write(key, w.astype(ST_TO_NP[st], copy=False))
                    bar.bytes(math.prod(shape) * ST_TO_NP[st].itemsize)
                    bar.tensors()
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(builtin, f, indent=2)
        with open(os.path.join(tmp, ORIGINAL_CONFIG_NAME), "w") as f:
            json.dump(original, f, indent=2)
    return dst


def save_hf_checkpoint(model, config: ModelConfig | None, path: str, *, max_shard_size: int | str = "5GB",
                       dtype: str | None = None, router_dtype: str = "float32", overwrite: bool = False,
                       progress: bool = False) -> str:
    """Write ``model`` as a folder ``transformers.MiniMaxForCausalLM.from_pretrained`` loads.

    Streams one tensor at a time: each HF tensor is sliced out of its stacked parameter on the devices,
    fetched, transposed and appended to the current safetensors file. ``dtype`` defaults to the
    config's ``param_dtype``; the router is written as ``router_dtype`` (float32, as in the released
    checkpoints). Also writes ``config.original.json`` (remote-code form). See the module docstring
    about ``rotary_dim`` in transformers.
    """
    config = config or model.config
    if config != model.config:
        raise ValueError("save_hf_checkpoint: config differs from model.config")
    key_map = hf_key_map(config)
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    missing = sorted({t.path for t in key_map.values()} - set(flat))
    if missing:
        raise CheckpointError(f"model has no parameter {missing[0]} that the key table needs")
    remote = [p for p, v in flat.items() if isinstance(v, jax.Array) and not v.is_fully_addressable]
    if remote:
        raise CheckpointError(f"save_hf_checkpoint: parameter {'.'.join(map(str, remote[0]))} has shards on other "
                              f"processes; on a multi-host mesh use save_orbax, then orbax_to_hf on one host")

    def get(key: str) -> np.ndarray:
        t = key_map[key]
        leaf = flat[t.path]
        piece = leaf[t.index] if t.index else leaf
        return to_hf(t.kind, np.asarray(jax.device_get(piece)))

    return write_hf_folder(config, get, path, dtype=dtype or config.param_dtype, router_dtype=router_dtype,
                           max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
