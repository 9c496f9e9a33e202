"""Orbax checkpoints of a run: train state, data-iterator position and the run's config.

Layout: ``run_dir/checkpoints/<step>/{state, data, config}``: ``state`` the train-state pytree
(sharded arrays, restored straight into their shardings), ``data`` the iterator state of every host
(Grain's checkpoint handler: ``process_<i>-of-<n>.json``, each host restores its own),
``config`` the operative gin config and the resolved dataclasses (JSON) of the run that wrote it.
Saves are asynchronous (training continues while the arrays are written); the manager keeps the last
``keep`` checkpoints. A human-readable copy of the operative config is also written to
``run_dir/config.gin`` and ``run_dir/checkpoints/<step>.gin`` (beside each checkpoint).
"""

from __future__ import annotations

import os
from typing import Any

import json

import grain
import jax
import orbax.checkpoint as ocp


class _StateBox:
    """Holds one host's iterator state (captured at the step being saved) for Grain's handler, which
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
    def __init__(self, run_dir: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
        )
        self._gin_pending: list[tuple[int, str]] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict[str, Any], config: dict[str, Any], *, force=False) -> bool:
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_StateBox(data_state)),
                                    config=ocp.args.JsonSave(config)),
            force=force,
        )
        if saved and jax.process_index() == 0:
            self._gin_pending.append((step, config.get("operative_gin", "")))
        return saved

    def _flush_gin(self) -> None:
        keep = set(self.all_steps())
        for step, text in self._gin_pending:
            if step in keep:
                with open(os.path.join(self.directory, f"{step}.gin"), "w") as f:
                    f.write(text)
        for name in os.listdir(self.directory):
            if name.endswith(".gin") and name[:-4].isdigit() and int(name[:-4]) not in keep:
                os.remove(os.path.join(self.directory, name))
        self._gin_pending = []

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            self._flush_gin()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restore into ``abstract_state`` (``ShapeDtypeStruct`` leaves carrying their shardings)."""
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
