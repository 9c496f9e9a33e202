"""Orbax checkpoints of a run: train state, data-source position and the run's config.

Layout: ``run_dir/checkpoints/<step>/{state, data, config}``: ``state`` the train-state pytree
(sharded arrays, restored straight into their shardings), ``data`` the position of the batch source
of every host (Grain's checkpoint handler: ``process_<i>-of-<n>.json``, each host restores its own;
for RL: the prompt order and the rollout random state), ``config`` the operative gin config and the
resolved dataclasses (JSON) of the run that wrote it. Saves are asynchronous (training continues while
the arrays are written); the manager keeps the last ``keep`` checkpoints.

A human-readable copy of the operative config is written beside each checkpoint as
``run_dir/checkpoints/<step>.gin``, atomically (a temporary file renamed into place) and *before* the
checkpoint is committed, so a checkpoint that exists always has its ``.gin`` even after ``kill -9``
(a ``.gin`` whose checkpoint never committed is removed at the next save or close).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(run_dir: str) -> str:
    return os.path.abspath(os.path.join(run_dir, "checkpoints"))


def finished_steps(run_dir: str) -> list[int]:
    """Committed checkpoint steps in ``run_dir`` (read-only: creates nothing). Orbax writes a step under
    a temporary name and renames it to the bare number when it is complete."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def read_saved_config(run_dir: str, step: int) -> dict[str, Any]:
    """The ``config`` item of a checkpoint (``{"operative_gin", "config"}``), read without Orbax (read-only);
    ``{}`` when it cannot be read."""
    path = os.path.join(checkpoint_dir(run_dir), str(step), "config", "metadata")
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _StateBox:
    """Holds one host's source state (captured at the step being saved) for Grain's handler, which
    writes ``get_state()`` bytes to ``process_<i>-of-<n>.json`` and reads them back with ``set_state``."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """The run's ``CheckpointManager``. Creating it creates ``run_dir/checkpoints``: build it only after
    every check of the run has passed."""

    def __init__(self, run_dir: str, *, keep: int, async_save: bool = True):
        self.directory = checkpoint_dir(run_dir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
        )
        self._is_main = jax.process_index() == 0

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def gin_path(self, step: int) -> str:
        return os.path.join(self.directory, f"{step}.gin")

    def save(self, step: int, state, data_state: dict[str, Any], config: dict[str, Any], *, force=False) -> bool:
        if self._is_main:  # before the commit: a committed checkpoint always has its .gin
            write_atomic(self.gin_path(step), config.get("operative_gin", ""))
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=grain.checkpoint.CheckpointSave(_StateBox(data_state)),
                                    config=ocp.args.JsonSave(config)),
            force=force,
        )
        if not saved and self._is_main:
            os.remove(self.gin_path(step))
        return saved

    def _remove_stale_gin(self) -> None:
        """Drop the ``.gin`` of checkpoints the manager deleted (``keep``) or that never committed."""
        keep = set(self.all_steps())
        for name in os.listdir(self.directory):
            stem = name[:-4] if name.endswith(".gin") else ""
            if stem.isdigit() and int(stem) not in keep:
                os.remove(os.path.join(self.directory, name))
            elif ".gin.tmp-" in name:
                os.remove(os.path.join(self.directory, name))

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self._is_main:
            self._remove_stale_gin()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restore into ``abstract_state`` (``ShapeDtypeStruct`` leaves carrying their shardings; ``None``:
        as saved)."""
        box = _StateBox()
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    data=grain.checkpoint.CheckpointRestore(box), config=ocp.args.JsonRestore()),
        )
        return out["state"], box.state, out["config"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
