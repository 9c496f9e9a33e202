"""The setup shared by pretraining and RL: checks first, then the run folder, the checkpointer, the state.

Order (every check before anything is written, so a bad config or bad data leaves no run folder):

1. the caller's own checks (mesh layout: :func:`check_batch_layout`; the batch source; the optimizer);
2. :func:`find_resume` (read-only): the checkpoint to resume from, the ``TrainConfig.resume`` mode, a
   checkpoint written for a different model;
3. :func:`open_run` creates the run folder, writes ``config.gin``, drops ``metrics.jsonl`` entries past
   the restored step, opens the :class:`~m1_jax.train.checkpoint.Checkpointer` and restores the state
   exactly (or initialises it), and the :class:`~m1_jax.train.metrics.MetricsLogger`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax

import sharding
from m1_jax.config import ConfigError, ModelConfig
from m1_jax.train.checkpoint import (Checkpointer, abstract_with_shardings, checkpoint_dir, finished_steps,
                                     read_saved_config, write_atomic)
from m1_jax.train.metrics import MetricsLogger

# TrainConfig / RLConfig fields that only steer one invocation (changing them on resume is not noted).
RUN_CONTROL = {"stop_after", "resume", "run_dir", "log_every", "progress_bar", "tensorboard", "sample_prompt",
               "sample_tokens", "sample_temperature", "fault_steps", "num_threads", "prefetch_buffer_size",
               "eval_every", "init_checkpoint", "reward_errors", "compilation_cache_dir"}
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "num_key_value_heads", "intermediate_size", "num_local_experts", "layer_types", "param_dtype")


def console(verbose: bool) -> Callable[..., None]:
    """``print`` on the main process when ``verbose``, else nothing."""
    return print if (verbose and jax.process_index() == 0) else (lambda *a, **k: None)


def enable_compilation_cache(path: str | None) -> None:
    """XLA's persistent compilation cache in ``path`` (``None``: leave JAX's setting alone). Programs that
    took at least a second to compile are stored; a later run of the same programs loads them."""
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def check_batch_layout(mesh, batch_size: int, seq_len: int, *, batch_field: str = "DataConfig.batch_size",
                       seq_field: str = "DataConfig.seq_len") -> None:
    sizes = sharding.mesh_sizes(mesh)
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if batch_size % batch_ways:
        raise ConfigError(f"{batch_field} = {batch_size} is invalid: expected a multiple of "
                          f"data x fsdp x expert = {batch_ways} (mesh {sizes})")
    if seq_len % sizes["context"]:
        raise ConfigError(f"{seq_field} = {seq_len} is invalid: expected a multiple of context = {sizes['context']}")


def mesh_summary(mesh) -> str:
    return str({k: v for k, v in sharding.mesh_sizes(mesh).items() if v > 1} or "single device")


@dataclasses.dataclass(frozen=True)
class Resume:
    """What :func:`find_resume` found: the checkpoint step to resume from (``None``: a fresh start) and its
    saved config item (``{"operative_gin", "config"}``)."""

    step: int | None
    saved: dict[str, Any]


def find_resume(train_cfg, model: ModelConfig) -> Resume:
    """Read-only: the newest committed checkpoint of ``train_cfg.run_dir``, checked against
    ``train_cfg.resume`` and the model shape."""
    steps = finished_steps(train_cfg.run_dir)
    latest = steps[-1] if steps else None
    where = checkpoint_dir(train_cfg.run_dir)
    if train_cfg.resume == "must" and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {where}")
    if train_cfg.resume == "never" and latest is not None:
        raise ConfigError(f"TrainConfig.resume = 'never' but {where} already holds checkpoints "
                          f"(latest step {latest}); choose another TrainConfig.run_dir")
    saved = read_saved_config(train_cfg.run_dir, latest) if latest is not None else {}
    check_saved_model(saved, model, train_cfg.run_dir)
    return Resume(latest, saved)


def check_saved_model(saved: dict[str, Any], model: ModelConfig, run_dir: str) -> None:
    saved_model = (saved.get("config") or {}).get("model")
    if saved_model is None:
        return
    now = json.loads(json.dumps(dataclasses.asdict(model)))
    diff = [f for f in _SHAPE_FIELDS if saved_model.get(f) != now.get(f)]
    if diff:
        raise ConfigError(f"the checkpoint in {run_dir} was written for a different model: fields "
                          f"{diff} differ (checkpoint: {[saved_model.get(f) for f in diff]}, now: "
                          f"{[now.get(f) for f in diff]}); use another TrainConfig.run_dir")


def config_changes(saved: dict[str, Any], now: dict[str, Any], sections=("train", "data", "optimizer", "rl")) -> list[str]:
    """Fields (other than run control) whose value differs from the checkpoint's run."""
    old = saved.get("config") or {}
    out = []
    for section in sections:
        for k, v in (now.get(section) or {}).items():
            if k in RUN_CONTROL or not isinstance(old.get(section), dict) or k not in old[section]:
                continue
            if old[section][k] != v:
                out.append(f"{section}.{k}: {old[section][k]!r} -> {v!r}")
    return out


def trim_metrics(run_dir: str, step: int) -> int:
    """Drop the ``metrics.jsonl`` entries past ``step`` (they are replayed after a resume from ``step``) and
    any line a kill cut short; returns how many lines were dropped. Rewritten atomically."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
                ok = isinstance(entry, dict) and int(entry.get("step", 0)) <= step
            except (ValueError, TypeError):
                ok = False
            if ok:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_atomic(path, "".join(kept))
    return dropped


def jit_init(fn: Callable[..., Any], shardings, mesh, *args):
    """``fn(*args)`` run once under ``jit`` on ``mesh`` with ``shardings`` as its output layout (each array is
    created in place, never gathered on one device)."""
    with jax.set_mesh(mesh):
        return jax.jit(fn, out_shardings=shardings)(*args)


@dataclasses.dataclass
class Session:
    """A started run: the folder exists, the state is on the mesh, the logger is open."""

    run_dir: str
    mesh: Any
    ckpt: Checkpointer
    state: Any
    source_state: Any  # the batch source's saved position (None on a fresh start)
    start: int  # steps already done
    end: int  # this invocation stops here (stop_after or steps)
    resumed_from: int | None
    run_meta: dict[str, Any]  # written with every checkpoint
    say: Callable[..., None]
    log: MetricsLogger | None = None

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def open_run(run, *, mesh, resume: Resume, abstract_state, shardings, init_state: Callable[[], Any],
             run_meta: dict[str, Any], say: Callable[..., None], as_dict_now: dict[str, Any] | None = None) -> Session:
    """Create the run folder and checkpointer, then restore the state from ``resume.step`` (exactly: arrays
    straight into ``shardings``) or call ``init_state()``, which returns the state placed on the mesh (see
    :func:`jit_init`). ``init_state`` is only called on a fresh start, so it may run work (the RL warm-up).
    """
    tc = run.train
    enable_compilation_cache(tc.compilation_cache_dir)  # before the first compile (init_state below)
    is_main = jax.process_index() == 0
    os.makedirs(tc.run_dir, exist_ok=True)
    if is_main:
        write_atomic(os.path.join(tc.run_dir, "config.gin"), run.operative_gin)
        dropped = trim_metrics(tc.run_dir, resume.step or 0)
        if dropped and resume.step:
            say(f"  metrics.jsonl: dropped {dropped} entries past step {resume.step} (they are replayed)")
    ckpt = Checkpointer(tc.run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    end = tc.stop_after if tc.stop_after is not None else tc.steps
    if resume.step is not None:
        state, source_state, saved = ckpt.restore(resume.step, abstract_with_shardings(abstract_state, shardings))
        if as_dict_now is not None:
            changes = config_changes(saved, as_dict_now)
            if changes:
                say("  note: resuming with a config that differs from the checkpoint's (the data order and the "
                    "schedule follow the new values): " + "; ".join(changes))
        start = int(jax.device_get(state["step"]))
        say(f"  resumed from {ckpt.directory}/{resume.step} (step {start})")
    else:
        state = init_state()
        source_state, start = None, 0
    return Session(run_dir=tc.run_dir, mesh=mesh, ckpt=ckpt, state=state, source_state=source_state, start=start,
                   end=end, resumed_from=resume.step, run_meta=run_meta, say=say)
