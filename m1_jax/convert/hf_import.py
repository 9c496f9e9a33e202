"""Read a Hugging Face / original MiniMax checkpoint folder into ``MiniMaxForCausalLM``, tensor by tensor.

``plan_import`` checks a folder against the key table (config, index, headers; no weights read) and
says where every one of our parameters comes from. ``load_hf_checkpoint`` then builds each parameter
directly in its target sharding (``build_leaf``): the distinct shards this process holds are filled
from the HF tensors they need, in batches of bounded host memory, each tensor read once per batch; a
batch goes to its devices before the next is filled. Host memory: one batch plus one tensor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from m1_jax.config import FULL, LINEAR, ConfigError, ModelConfig
from m1_jax.convert.errors import CheckpointError
from m1_jax.convert.mapping import (DERIVED_KEY, FusedPart, Target, fused_key_map, hf_key_map,
                                    leaf_sources, take_fused, to_ours)
from m1_jax.convert.safetensors_io import (INDEX_NAME, NAME_TO_ST, ST_TO_NAME, ST_TO_NP, SafetensorsFolder,
                                           TensorReader)
from m1_jax.model import abstract_model

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_EXPERT_KEY = re.compile(r"block_sparse_moe\.experts\.(\d+)\.")
_LIGHTNING_PARTS = ("qkv_proj", "output_gate", "out_proj", "self_attn.norm.")
_SOFTMAX_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_FLOAT_ST = ("F32", "BF16", "F16")
_ROUTER_KEY = re.compile(r"^model\.layers\.\d+\.(block_sparse_moe|mlp)\.gate\.weight$")


def config_from_hf(hf_cfg: dict, where: str, **overrides) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf_cfg, **overrides)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


@dataclasses.dataclass
class ImportPlan:
    """A checked checkpoint folder: where every on-disk key of ``key_map`` is read from."""

    folder: SafetensorsFolder
    config: ModelConfig
    key_map: dict[str, Target]
    # on-disk key -> (key in the files, FusedPart when it is a slice of a transformers-5 fused tensor)
    sources: dict[str, tuple[str, FusedPart | None]]
    storage_dtype: str | None  # checkpoint dtype name ("bfloat16", ...); None when no headers were read
    router_dtype: str | None
    dropped: list[str]  # derived HF buffers that are ignored

    @property
    def num_params(self) -> int:
        return sum(math.prod(t.hf_shape) for t in self.key_map.values())

    def tensor_bytes(self, key: str) -> int:
        src, part = self.sources[key]
        info = self.folder.tensors.get(src)
        if info is None:
            return 0
        if part is None:
            return info.nbytes
        return math.prod(self.key_map[key].hf_shape) * ST_TO_NP[info.dtype].itemsize


# ------------------------------------------------------------------------------------------- checking
def _describe_shape(kind_key: str, c: ModelConfig) -> str:
    if "embed_tokens" in kind_key or kind_key == "lm_head.weight":
        return f"vocab_size={c.vocab_size}, hidden_size={c.hidden_size}"
    if "experts" in kind_key or "gate_up_proj" in kind_key or "down_proj" in kind_key:
        return f"num_local_experts={c.num_local_experts}, hidden_size={c.hidden_size}, " \
               f"intermediate_size={c.intermediate_size}"
    if "gate.weight" in kind_key:
        return f"num_local_experts={c.num_local_experts}, hidden_size={c.hidden_size}"
    if any(p in kind_key for p in ("k_proj", "v_proj")):
        return f"num_key_value_heads={c.num_key_value_heads}, head_dim={c.head_dim}, hidden_size={c.hidden_size}"
    if "self_attn" in kind_key:
        return f"num_attention_heads={c.num_attention_heads}, head_dim={c.head_dim}, hidden_size={c.hidden_size}"
    return f"hidden_size={c.hidden_size}"


def _contradiction(key: str, c: ModelConfig, where: str) -> str | None:
    """If an unexpected key means config.json contradicts the weights, say how."""
    m = _LAYER_KEY.match(key)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= c.num_hidden_layers:
        return (f"{where}: config.json contradicts the weights: num_hidden_layers = {c.num_hidden_layers} but "
                f"the checkpoint has tensor {key!r} of layer {layer}")
    t = c.layer_types[layer]
    if rest.startswith("self_attn."):
        if t == FULL and any(p in rest for p in _LIGHTNING_PARTS):
            return (f"{where}: config.json contradicts the weights: layer {layer} is {FULL!r} in config.json "
                    f"(layer_types / attn_type_list) but the checkpoint has {key!r}, a {LINEAR!r} (lightning) "
                    f"tensor")
        if t == LINEAR and any(p in rest for p in _SOFTMAX_PARTS):
            return (f"{where}: config.json contradicts the weights: layer {layer} is {LINEAR!r} in config.json "
                    f"(layer_types / attn_type_list) but the checkpoint has {key!r}, a {FULL!r} (softmax) tensor")
    e = _EXPERT_KEY.search(rest)
    if e and int(e.group(1)) >= c.num_local_experts:
        return (f"{where}: config.json contradicts the weights: num_local_experts = {c.num_local_experts} but the "
                f"checkpoint has tensor {key!r} of expert {int(e.group(1))}")
    return None


def _storage_dtype(folder: SafetensorsFolder, hf_cfg: dict) -> tuple[str | None, str]:
    """The checkpoint's dtype name and where it came from (config.json, else the embedding's dtype)."""
    named = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype")
    if named in NAME_TO_ST:
        return named, f"config.json torch_dtype = {named}"
    info = folder.tensors.get("model.embed_tokens.weight")
    if info is not None and info.dtype in ST_TO_NAME:
        return ST_TO_NAME[info.dtype], f"the dtype of model.embed_tokens.weight ({info.dtype})"
    return None, "unknown"


def plan_import(path: str, *, dtype: str | None = None, headers: bool = True) -> ImportPlan:
    """Check a HF checkpoint folder against the key table without reading any weights.

    Raises ``CheckpointError`` naming the file and tensor for: a missing, unexpected, wrongly shaped or
    wrongly typed tensor; a config.json that contradicts the weights; a truncated or corrupt file; an
    index that disagrees with the files. ``headers=False`` checks only config.json and the index keys.
    """
    folder = SafetensorsFolder(path, headers=headers)
    hf_cfg = folder.config
    storage, storage_why = _storage_dtype(folder, hf_cfg) if headers else (None, "")
    target = dtype or storage
    overrides = {"param_dtype": target, "dtype": target} if target else {}
    config = config_from_hf(hf_cfg, os.path.join(path, "config.json"), **overrides)
    key_map = hf_key_map(config)
    fused = fused_key_map(config)
    sources: dict[str, tuple[str, FusedPart | None]] = {}
    dropped: list[str] = []
    expected_shape: dict[str, tuple] = {}

    def where(key: str) -> str:
        info = folder.tensors.get(key)
        if info is not None:
            return info.file
        if folder.index is not None and key in folder.index:
            return os.path.join(path, INDEX_NAME)
        return path

    for key in folder.keys:
        if DERIVED_KEY.match(key):
            dropped.append(key)
        elif key in key_map:
            sources[key] = (key, None)
            expected_shape[key] = key_map[key].hf_shape
        elif key in fused:
            shape, parts = fused[key]
            expected_shape[key] = shape
            for part in parts:
                sources[part.key] = (key, part)
        else:
            msg = _contradiction(key, config, where(key))
            if msg is None and key.replace(".mlp.", ".block_sparse_moe.", 1) != key:
                msg = _contradiction(key.replace(".mlp.", ".block_sparse_moe.", 1), config, where(key))
            raise CheckpointError(msg or f"{where(key)}: unexpected tensor {key!r}: not part of a MiniMax "
                                         f"checkpoint with this config.json")
    missing = [k for k in key_map if k not in sources]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f"; config.json expects {len(key_map)} tensors")
    router = None
    if headers:
        emb = folder.tensors.get("model.embed_tokens.weight")
        if emb is not None and emb.shape != key_map["model.embed_tokens.weight"].hf_shape:
            raise CheckpointError(f"{emb.file}: config.json contradicts the weights: vocab_size={config.vocab_size}, "
                                  f"hidden_size={config.hidden_size} mean 'model.embed_tokens.weight' of shape "
                                  f"{key_map['model.embed_tokens.weight'].hf_shape}, but it has shape {emb.shape}")
        for key, want in expected_shape.items():
            info = folder.tensors[key]
            if info.shape != tuple(want):
                raise CheckpointError(f"{info.file}: tensor {key!r} has shape {info.shape}; expected {tuple(want)} "
                                      f"(from config.json: {_describe_shape(key, config)})")
        for key, info in folder.tensors.items():
            if key in dropped:
                continue
            if info.dtype not in _FLOAT_ST:
                raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {info.dtype}; expected a float "
                                      f"dtype ({', '.join(_FLOAT_ST)})")
            want = NAME_TO_ST[storage] if storage else info.dtype
            if _ROUTER_KEY.match(key):
                if info.dtype not in ("F32", want):
                    raise CheckpointError(f"{info.file}: router tensor {key!r} has dtype {info.dtype}; expected "
                                          f"F32 or {want} ({storage_why})")
                router = router or ST_TO_NAME[info.dtype]
            elif info.dtype != want:
                raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {info.dtype}; expected {want} "
                                      f"({storage_why})")
    return ImportPlan(folder, config, key_map, sources, storage, router, dropped)


# ------------------------------------------------------------------------------------------- reading
class SourceReader:
    """Reads on-disk keys of a plan (slicing transformers-5 fused tensors), keeping the last fused tensor."""

    def __init__(self, plan: ImportPlan, on_read: Callable[[int], None] | None = None):
        self.plan = plan
        self._reader = TensorReader(plan.folder)
        self._fused_key: str | None = None
        self._fused: np.ndarray | None = None
        self._on_read = on_read

    def hf(self, key: str) -> np.ndarray:
        """The HF tensor ``key`` (on-disk layout and dtype)."""
        src, part = self.plan.sources[key]
        if part is None:
            w = self._reader.read(src)
        else:
            if src != self._fused_key:
                self._fused, self._fused_key = None, None
                self._fused, self._fused_key = self._reader.read(src), src
            w = take_fused(part, self._fused)
        if self._on_read is not None:
            self._on_read(w.nbytes)
        return w

    def ours(self, key: str) -> np.ndarray:
        """The HF tensor ``key`` in our layout (one slice of a stacked leaf), still in its disk dtype."""
        return to_ours(self.plan.key_map[key].kind, self.hf(key), self.plan.config)

    def close(self) -> None:
        self._reader.close()
        self._fused = None


def _normalize(index: tuple, shape: tuple) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


class _Shard:
    """One distinct shard of a leaf: its slices, the devices that hold it, and (while filling) its buffer."""

    def __init__(self, sl: tuple[slice, ...], devices: list, nstack: int, dtype):
        self.sl, self.devices, self.nstack, self.dtype = sl, devices, nstack, np.dtype(dtype)
        self.shape = tuple(len(range(s.start, s.stop, s.step)) for s in sl)
        self.buf: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def local(self, stack_idx: tuple) -> tuple | None:
        """Where the slice ``stack_idx`` of the leaf goes in this shard (None if it is not in it)."""
        out = []
        for i, s in zip(stack_idx, self.sl[: self.nstack]):
            if not (s.start <= i < s.stop) or (i - s.start) % s.step:
                return None
            out.append((i - s.start) // s.step)
        return tuple(out)


def build_leaf(reader: SourceReader, entries: list[tuple[tuple, str]], sds, sharding,
               host_bytes: int = 2 << 30) -> jax.Array:
    """One parameter, assembled in ``sharding`` from the HF tensors ``entries`` (``[(stack index, key)]``).

    The distinct shards this process holds are filled in batches of at most ``host_bytes`` (one shard if
    a shard is larger): each HF tensor a batch needs is read once and copied into every shard of the
    batch that holds part of it, then the batch goes to its devices and its host buffers are freed.
    """
    shape, nstack = tuple(sds.shape), len(entries[0][0])
    distinct: dict[tuple, _Shard] = {}
    for dev, index in sharding.addressable_devices_indices_map(shape).items():
        sl = _normalize(index, shape)
        key = tuple((s.start, s.stop, s.step) for s in sl)
        distinct.setdefault(key, _Shard(sl, [], nstack, sds.dtype)).devices.append(dev)
    batches: list[list[_Shard]] = [[]]
    size = 0
    for shard in distinct.values():
        if batches[-1] and size + shard.nbytes > host_bytes:
            batches.append([])
            size = 0
        batches[-1].append(shard)
        size += shard.nbytes
    arrays = []
    for batch in batches:
        for shard in batch:
            shard.buf = np.empty(shard.shape, shard.dtype)
        for stack_idx, key in entries:
            targets = [(shard, shard.local(stack_idx)) for shard in batch]
            targets = [(shard, loc) for shard, loc in targets if loc is not None]
            if not targets:
                continue
            w = reader.ours(key)
            for shard, loc in targets:
                shard.buf[loc] = w[shard.sl[nstack:]]
        for shard in batch:
            arrays += [jax.device_put(shard.buf, d) for d in shard.devices]
            shard.buf = None
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def leaf_entries(plan: ImportPlan) -> dict[tuple, list[tuple[tuple, str]]]:
    return leaf_sources(plan.key_map)


def load_hf_checkpoint(path: str, *, dtype: str | None = None, mesh=None, progress: bool = False,
                       host_bytes: int = 2 << 30):
    """Read ``config.json`` and the safetensors files of a HF MiniMax checkpoint; return ``(config, model)``.

    Each parameter is assembled straight into its sharding on ``mesh`` (default: the first device) by
    ``build_leaf``: this process's distinct shards are filled in batches of at most ``host_bytes`` of host
    memory, each HF tensor read once per batch. HF's derived decay buffers are dropped. ``dtype``
    overrides the parameter dtype (default: the checkpoint's). The router stays float32.
    """
    from m1_jax.convert.placement import param_shardings
    from m1_jax.convert.progress import Progress

    plan = plan_import(path, dtype=dtype)
    config = plan.config
    graphdef, abstract_state = abstract_model(config)
    flat = dict(nnx.to_flat_state(abstract_state))
    shardings = param_shardings(abstract_state, mesh)
    entries = leaf_entries(plan)
    total = sum(plan.tensor_bytes(k) for k in plan.key_map)
    with Progress(total, len(plan.key_map), f"import {os.path.basename(os.path.normpath(path))}",
                  enabled=progress) as bar:
        reader = SourceReader(plan, on_read=bar.bytes)
        try:
            for p, var in flat.items():
                var.set_value(build_leaf(reader, entries[p], var.get_value(), shardings[p], host_bytes))
                bar.tensors(len(entries[p]))
        finally:
            reader.close()
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return config, model


def iter_leaf_pieces(reader: SourceReader, entries: list[tuple[tuple, str]], dtype) -> Iterator[tuple[tuple, np.ndarray]]:
    """``(stack index, slice in our layout and dtype)`` for every HF tensor of one leaf, in order."""
    for stack_idx, key in entries:
        yield stack_idx, np.asarray(reader.ours(key), dtype=dtype)
