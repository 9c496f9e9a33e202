"""Orbax checkpoints of the model's parameters, and streaming HF <-> Orbax conversion.

The checkpoint is a standard Orbax PyTree checkpoint (OCDBT + zarr) of ``nnx.to_pure_dict`` of the
model's ``nnx.Param`` state, with the full ``ModelConfig`` in its custom metadata under ``"m1_jax"``.
``restore_orbax`` restores it onto any mesh (each device reads only its own shards).

``hf_to_orbax`` / ``orbax_to_hf`` never build the model: a stacked parameter is written (read) one
HF tensor slice at a time through tensorstore, so host memory holds a few tensors at a time. The
writer is an Orbax type handler for a lazy ``StreamedLeaf`` whose zarr chunks nest inside one slice;
its files are the same format ``save_orbax`` writes and ``restore_orbax`` reads.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from m1_jax.config import ModelConfig
from m1_jax.convert import training_checkpoint
from m1_jax.convert.atomic import staged_path
from m1_jax.convert.errors import CheckpointError
from m1_jax.convert.hf_export import write_hf_folder
from m1_jax.convert.hf_import import SourceReader, iter_leaf_pieces, leaf_entries, plan_import
from m1_jax.convert.mapping import hf_key_map, to_hf
from m1_jax.convert.orbax_meta import (FORMAT_VERSION, META_KEY, config_from_dict, config_to_dict, leaf_name,  # noqa: F401
                                       read_metadata, read_orbax_layout, saved_leaf_names)
from m1_jax.convert.placement import param_shardings
from m1_jax.convert.progress import Progress
from m1_jax.model import abstract_model

_WRITES_IN_FLIGHT = 4
_OCDBT_NODE_CACHE_BYTES = 16 << 20


def _metadata(config: ModelConfig, **extra) -> dict:
    return {META_KEY: {"format": FORMAT_VERSION, "config": config_to_dict(config), **extra}}


def _nested(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


# ------------------------------------------------------------------------------------------- in memory
def save_orbax(model, config: ModelConfig | None, path: str, *, overwrite: bool = False, **extra_metadata) -> str:
    """Save the model's parameters (any sharding) as an Orbax checkpoint at ``path``."""
    import orbax.checkpoint as ocp

    config = config or model.config
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with staged_path(path, overwrite=overwrite) as tmp:
        ocp.PyTreeCheckpointer().save(tmp, args=ocp.args.PyTreeSave(pure, custom_metadata=_metadata(config, **extra_metadata)))
    return path


def restore_orbax(path: str, *, mesh=None, dtype: str | None = None):
    """Restore ``(config, model)`` from an Orbax checkpoint onto ``mesh`` (default: the first device).

    The mesh need not be the one that saved it. ``dtype`` overrides the parameter dtype.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta = read_metadata(path)
    config = config_from_dict(meta["config"])
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=dtype)
    graphdef, abstract_state = abstract_model(config)
    shardings = param_shardings(abstract_state, mesh)
    flat = dict(nnx.to_flat_state(abstract_state))
    target = _nested({p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=shardings[p])
                      for p, v in flat.items()})
    _check_tree(path, saved_leaf_names(meta["_tree_keys"]), {leaf_name(p) for p in flat})
    restored = ocp.StandardCheckpointer().restore(path, target)
    for p, var in flat.items():
        v = restored
        for k in p:
            v = v[k]
        var.set_value(v)
    return config, nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_tree(path: str, have: set[str], want: set[str]) -> None:
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        raise CheckpointError(f"{path}: Orbax checkpoint has no parameter {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{path}: Orbax checkpoint has unexpected parameter {extra[0]!r} "
                              f"(not in the model its config describes)")


# ------------------------------------------------------------------------------------------- streaming
class StreamedLeaf:
    """A parameter Orbax writes piece by piece: ``pieces()`` yields ``(index, array)`` covering it."""

    def __init__(self, shape: tuple, dtype, write_shape: tuple, pieces: Callable[[], Iterator[tuple[tuple, np.ndarray]]]):
        self.shape, self.dtype, self.write_shape, self.pieces = tuple(shape), np.dtype(dtype), tuple(write_shape), pieces


_streaming_registry = None


def _write_context():
    """Orbax's tensorstore context with a smaller OCDBT B-tree node cache (Orbax's is 100 MB), so that
    streaming writes keep host memory near the pieces in flight."""
    import tensorstore as ts

    return ts.Context({"file_io_concurrency": {"limit": 128},
                       "cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_NODE_CACHE_BYTES}})


def _streaming_checkpointer():
    """An Orbax PyTree checkpointer whose only type handler writes ``StreamedLeaf``.

    The handler has the typestr of numpy arrays (the files read back as arrays), so registering it in
    Orbax's global registry would replace the numpy handler for every later save and restore in the
    process (and log "Type handler registry overriding ..." each time); a private registry does neither.
    """
    global _streaming_registry
    import orbax.checkpoint as ocp

    if _streaming_registry is None:
        _streaming_registry = _make_streaming_registry()
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_streaming_registry))


def _make_streaming_registry():
    import tensorstore as ts
    from orbax.checkpoint import future, type_handlers
    from orbax.checkpoint._src.serialization import ocdbt_utils, tensorstore_utils as ts_utils
    from orbax.checkpoint._src.serialization.type_handlers import NumpyHandler

    class StreamedLeafHandler(NumpyHandler):
        """Writes a ``StreamedLeaf`` with the zarr layout of a numpy array, one piece at a time; it reads
        back as a numpy / jax array."""

        async def _background_serialize(self, values, infos, args=None):
            context = _write_context()
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                spec = ts_utils.build_array_write_spec(
                    info=info, arg=arg, global_shape=value.shape, local_shape=value.write_shape,
                    dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                ).json
                t = await ts.open(ts.Spec(spec), create=True, open=True, context=context)
                pending: list = []  # a few writes in flight; memory stays at that many pieces
                try:
                    for index, arr in value.pieces():
                        pending.append(asyncio.ensure_future(t[index].write(arr)))
                        if len(pending) >= _WRITES_IN_FLIGHT:
                            await pending.pop(0)
                    while pending:
                        await pending.pop(0)
                except BaseException:
                    # let the writes in flight finish before the error unwinds and the folder is removed
                    await asyncio.gather(*pending, return_exceptions=True)
                    raise

        async def serialize(self, values, infos, args=None):
            import orbax.checkpoint as ocp

            args = args or [ocp.SaveArgs()] * len(values)
            return [future.CommitFutureAwaitingContractedSignals(
                self._background_serialize(values, infos, args), name="m1_jax_streamed_leaf")]

    # jax.Array's handler only for Orbax's array-metadata store (it warns when the registry has none)
    return type_handlers.create_type_handler_registry((StreamedLeaf, StreamedLeafHandler()),
                                                      (jax.Array, type_handlers.get_type_handler(jax.Array)))


def hf_to_orbax(src: str, dst: str, *, dtype: str | None = None, progress: bool = False,
                overwrite: bool = False) -> ModelConfig:
    """Convert a HF checkpoint folder to an Orbax checkpoint without building the model."""
    import orbax.checkpoint as ocp

    plan = plan_import(src, dtype=dtype)
    config = plan.config
    _, abstract_state = abstract_model(config)
    flat = dict(nnx.to_flat_state(abstract_state))
    entries = leaf_entries(plan)
    total = sum(plan.tensor_bytes(k) for k in plan.key_map)
    with Progress(total, len(plan.key_map), f"hf-to-orbax {os.path.basename(os.path.normpath(src))}",
                  enabled=progress) as bar:
        reader = SourceReader(plan, on_read=bar.bytes)

        def make(p, sds):
            es = entries[p]
            nstack = len(es[0][0])

            def pieces():
                for idx, arr in iter_leaf_pieces(reader, es, sds.dtype):
                    yield idx, arr
                    bar.tensors()

            return StreamedLeaf(sds.shape, sds.dtype, (1,) * nstack + tuple(sds.shape[nstack:]), pieces)

        tree = _nested({p: make(p, v.get_value()) for p, v in flat.items()})
        meta = _metadata(config, source="hf", router_dtype=plan.router_dtype or "float32",
                         hf_dtype=plan.storage_dtype)
        try:
            with staged_path(dst, overwrite=overwrite) as tmp:
                with _streaming_checkpointer() as ckptr:
                    ckptr.save(tmp, args=ocp.args.PyTreeSave(tree, custom_metadata=meta))
        finally:
            reader.close()
    return config


class OrbaxLeafReader:
    """Reads slices of the parameters of an Orbax checkpoint through tensorstore (no full leaf in memory)."""

    def __init__(self, path: str, meta: dict, prefix: tuple = ()):
        self.path = os.path.abspath(path)
        self.meta = meta
        self.prefix = tuple(prefix)  # a train state's parameters live under ("params", ...) as nnx Variables
        self._open: dict[tuple, object] = {}
        # Bytes of the slices read and still referenced (tensorstore allocates them, so tracemalloc does
        # not see them), and the most at any moment: the reader's share of host memory.
        self.live_bytes = 0
        self.peak_live_bytes = 0

    def _stored_name(self, path: tuple) -> str:
        return leaf_name(self.prefix + tuple(path) + ("value",)) if self.prefix else leaf_name(path)

    def _spec(self, name: str) -> dict:
        driver = "zarr3" if self.meta["_use_zarr3"] else "zarr"
        if self.meta["_use_ocdbt"]:
            kv = {"driver": "ocdbt", "base": f"file://{self.path}", "path": name}
        else:
            kv = {"driver": "file", "path": os.path.join(self.path, name)}
        return {"driver": driver, "kvstore": kv}

    def leaf(self, path: tuple, shape: tuple):
        import tensorstore as ts

        if path not in self._open:
            try:
                t = ts.open(self._spec(self._stored_name(path)), open=True, read=True).result()
            except Exception as e:  # tensorstore raises ValueError / NotFoundError
                raise CheckpointError(f"{self.path}: cannot read parameter {leaf_name(path)!r} ({e})") from None
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{self.path}: parameter {leaf_name(path)!r} has shape {tuple(t.shape)}; "
                                      f"expected {tuple(shape)} (from the checkpoint's config)")
            self._open[path] = t
        return self._open[path]

    def read(self, path: tuple, shape: tuple, index: tuple) -> np.ndarray:
        t = self.leaf(path, shape)
        arr = np.asarray((t[index] if index else t).read().result())
        self.live_bytes += arr.nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(arr, self._release, arr.nbytes)  # views (transposes) keep arr alive
        return arr

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def _open_checked(src: str):
    """Metadata, config, the abstract parameter leaves (checked against the saved tree) and a leaf reader.

    ``src`` is an Orbax checkpoint of parameters (``save_orbax``, ``hf_to_orbax``) or a training checkpoint
    (a run folder, its ``checkpoints`` folder or a step folder: the parameters of the train state).
    """
    src = os.path.abspath(src)
    prefix: tuple = ()
    if not os.path.isfile(os.path.join(src, "_METADATA")) and training_checkpoint.is_training_checkpoint(src):
        step_dir = training_checkpoint.resolve_step_folder(src)
        config = training_checkpoint.model_config_from_run(training_checkpoint.read_run_config(step_dir), step_dir)
        src, prefix = os.path.join(step_dir, "state"), ("params",)
        _, meta = read_orbax_layout(src)
        meta["_training_step_dir"] = step_dir
    else:
        meta = read_metadata(src)
        config = config_from_dict(meta["config"])
    _, abstract_state = abstract_model(config)
    flat = dict(nnx.to_flat_state(abstract_state))
    _check_tree(src, saved_leaf_names(meta["_tree_keys"], prefix), {leaf_name(p) for p in flat})
    return config, meta, flat, OrbaxLeafReader(src, meta, prefix)


def orbax_to_hf(src: str, dst: str, *, max_shard_size: int | str = "5GB", dtype: str | None = None,
                router_dtype: str | None = None, progress: bool = False, overwrite: bool = False) -> ModelConfig:
    """Convert an Orbax checkpoint to a HF folder, one tensor at a time, without building the model.

    ``dtype`` defaults to the config's ``param_dtype``; ``router_dtype`` to the router dtype of the HF
    checkpoint the Orbax one came from (float32 otherwise).
    """
    config, meta, flat, reader = _open_checked(src)
    key_map = hf_key_map(config)

    def get(key: str) -> np.ndarray:
        t = key_map[key]
        return to_hf(t.kind, reader.read(t.path, flat[t.path].get_value().shape, t.index))

    write_hf_folder(config, get, dst, dtype=dtype or config.param_dtype,
                    router_dtype=router_dtype or meta.get("router_dtype") or "float32",
                    max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
    return config


def check_orbax(src: str) -> tuple[ModelConfig, dict]:
    """Check an Orbax checkpoint's metadata, tree and parameter shapes against its config (reads no
    weights: only the zarr metadata of each parameter)."""
    config, meta, flat, reader = _open_checked(src)
    for p, v in flat.items():
        reader.leaf(p, v.get_value().shape)
    return config, meta
