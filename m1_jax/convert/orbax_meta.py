"""What an Orbax checkpoint on disk says about itself: its storage layout, its saved leaf names and
(for the checkpoints this package writes) the ``ModelConfig`` under the custom metadata key ``"m1_jax"``.
Reads JSON only (no Orbax, no tensorstore)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os

from m1_jax.config import ModelConfig
from m1_jax.convert.errors import CheckpointError

META_KEY = "m1_jax"
FORMAT_VERSION = 1


def config_to_dict(config: ModelConfig) -> dict:
    d = dataclasses.asdict(config)
    d["layer_types"] = list(d["layer_types"])
    return d


def config_from_dict(d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise CheckpointError(f"orbax checkpoint metadata has unknown ModelConfig fields {unknown}")
    return ModelConfig(**d)


def read_orbax_layout(path: str) -> tuple[dict, dict]:
    """``(Orbax's _METADATA, the storage layout)`` of the PyTree checkpoint in ``path``."""
    file = os.path.join(path, "_METADATA")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: not an Orbax checkpoint (no _METADATA) nor a training checkpoint "
                              f"(a run folder or run_dir/checkpoints/<step> as train.py writes)")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read the Orbax metadata ({e})") from None
    layout = {"_use_zarr3": bool(meta.get("use_zarr3", False)), "_use_ocdbt": bool(meta.get("use_ocdbt", True)),
              "_tree_keys": list(meta.get("tree_metadata", {}))}
    return meta, layout


def read_metadata(path: str) -> dict:
    """The ``"m1_jax"`` custom metadata of an Orbax checkpoint written by this module."""
    meta, layout = read_orbax_layout(path)
    custom = meta.get("custom_metadata") or {}
    if META_KEY not in custom:
        raise CheckpointError(f"{path}: Orbax checkpoint without m1_jax metadata (the model config); "
                              f"write it with m1_jax.convert.save_orbax or `m1-jax convert hf-to-orbax`")
    return {**custom[META_KEY], **layout}


def saved_leaf_names(tree_keys, prefix: tuple = ()) -> set[str]:
    """Dotted names of the saved leaves under ``prefix`` (dropped), from Orbax's tree_metadata keys
    (``"('blocks', 'layers', '0', ...)"``). Under a prefix (a train state's ``params``) each leaf is an
    nnx Variable whose last key is ``value``; that is dropped too."""
    out = set()
    for k in tree_keys:
        try:
            path = tuple(str(x) for x in ast.literal_eval(k))
        except (ValueError, SyntaxError):
            path = tuple(k.split("."))
        if prefix:
            if path[:len(prefix)] != tuple(prefix):
                continue
            path = path[len(prefix):]
            if path and path[-1] == "value":
                path = path[:-1]
        out.add(".".join(path))
    return out


def leaf_name(path: tuple) -> str:
    """Orbax's name of a leaf (its keys joined with dots)."""
    return ".".join(str(k) for k in path)
