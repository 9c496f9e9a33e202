"""Load the model from a checkpoint that ``train.py`` wrote (parameters only, no optimizer state).

``train.py`` writes ``run_dir/checkpoints/<step>/{state, data, config}`` (m1_jax/train/checkpoint.py):
``state`` is an Orbax PyTree of the whole train state (``params``, ``opt_state``, ``step``, ...),
``config`` a JSON item with the run's resolved dataclasses (``config.model`` holds every ``ModelConfig``
field, ``config.data`` the ``DataConfig`` with the tokenizer). ``load_training_checkpoint`` accepts
the step folder, the ``checkpoints`` folder or the run folder (then the latest finished step), and
restores only ``state.params``, each parameter straight into its (optionally sharded) layout.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from flax import nnx

from m1_jax.config import ConfigError, ModelConfig
from m1_jax.convert.errors import CheckpointError
from m1_jax.convert.orbax_meta import config_from_dict, read_orbax_layout, saved_leaf_names
from m1_jax.convert.placement import param_shardings
from m1_jax.dtypes import DTYPE_NAMES
from m1_jax.model import abstract_model

_EXPECTED = ("a training checkpoint: a step folder run_dir/checkpoints/<step> holding state/ and config/ "
             "(as train.py writes), its checkpoints/ folder or the run folder")


def is_step_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isfile(os.path.join(path, "config", "metadata"))


def _finished_steps(checkpoints: str) -> list[int]:
    """Steps of the finished checkpoints in a ``checkpoints`` folder (Orbax writes a step under a temporary
    name and renames it to the bare number when it is complete)."""
    return sorted(int(n) for n in os.listdir(checkpoints)
                  if n.isdigit() and is_step_folder(os.path.join(checkpoints, n)))


def is_training_checkpoint(path: str) -> bool:
    """Whether ``path`` is a step, ``checkpoints`` or run folder of a training run (cheap: no file is read)."""
    if not os.path.isdir(path):
        return False
    if is_step_folder(path):
        return True
    for folder in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(folder) and _finished_steps(folder):
            return True
    return False


def resolve_step_folder(path: str) -> str:
    """The step folder ``path`` means: itself, or the latest finished step of a checkpoints / run folder."""
    shown = path
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{shown}: no such folder; expected {_EXPECTED}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{shown}: is a file; expected {_EXPECTED}")
    if is_step_folder(path):
        return path
    for folder in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(folder):
            steps = _finished_steps(folder)
            if steps:
                return os.path.join(folder, str(steps[-1]))
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.basename(path) == "checkpoints":
        raise CheckpointError(f"{shown}: holds no finished checkpoint (no <step>/ folder with state/ and "
                              f"config/); expected {_EXPECTED}")
    raise CheckpointError(f"{shown}: not a training checkpoint; expected {_EXPECTED}")


def read_run_config(step_dir: str) -> dict[str, Any]:
    """The run's config as saved beside the checkpoint: ``{"train", "data", "optimizer", "mesh", "model"}``."""
    file = os.path.join(step_dir, "config", "metadata")
    try:
        with open(file) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read the run's config ({e}); expected the JSON train.py "
                              "writes") from None
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{file}: no model config (expected a JSON object with config.model, as train.py "
                              "writes)")
    return config


def model_config_from_run(config: dict[str, Any], where: str) -> ModelConfig:
    try:
        return config_from_dict(config["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: the saved model config is not valid: {e}") from None


def _restore_params(state_dir: str, target: nnx.State) -> nnx.State:
    import orbax.checkpoint as ocp

    item = {"params": target}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    try:
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    except TypeError:  # an Orbax without partial_restore: an empty transform restores only what item names
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, transforms={})
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(state_dir, args=args)["params"]


def load_training_checkpoint(path: str, *, dtype: str | None = None, mesh=None):
    """``(config, model, info)`` from a checkpoint written by ``train.py``.

    ``path``: a step folder (``runs/tiny/checkpoints/200``), the ``checkpoints`` folder or the run folder
    (``runs/tiny``: its latest finished step). Only the parameters are read, each straight into its
    layout on ``mesh`` (the project's sharding rules; default: the first device). ``dtype`` overrides the
    parameter dtype (``"bfloat16"``, ...). ``info``: ``step``, ``directory`` (the step folder), ``run_dir``,
    ``tokenizer`` (the run's ``DataConfig.tokenizer``: ``"byte"`` or a tokenizer.json path, as given to
    the run), ``eos_token`` (``DataConfig.eos_token``), ``run_config`` (every saved section).
    Raises ``CheckpointError`` naming the path and what was expected.
    """
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise CheckpointError(f"dtype = {dtype!r}: expected one of {list(DTYPE_NAMES)}")
    step_dir = resolve_step_folder(path)
    run_config = read_run_config(step_dir)
    config = model_config_from_run(run_config, step_dir)
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=dtype)
    state_dir = os.path.join(step_dir, "state")

    graphdef, abstract_params = abstract_model(config)
    flat = dict(nnx.to_flat_state(abstract_params))
    want = {".".join(str(k) for k in p) for p in flat}
    have = saved_leaf_names(read_orbax_layout(state_dir)[1]["_tree_keys"], prefix=("params",))
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        what = (f"has no parameter {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                if missing else f"has unexpected parameter {extra[0]!r}")
        raise CheckpointError(f"{state_dir}: the train state {what}; expected the parameters of the model its "
                              f"config describes")
    shardings = param_shardings(abstract_params, mesh)
    for p, var in flat.items():
        sds = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=shardings[p]))
    try:
        params = _restore_params(state_dir, nnx.from_flat_state(flat))
    except CheckpointError:
        raise
    except Exception as e:  # Orbax / tensorstore raise ValueError, FileNotFoundError, ...
        raise CheckpointError(f"{state_dir}: cannot restore the parameters ({type(e).__name__}: {e})") from None
    model = nnx.merge(graphdef, params)

    data = run_config.get("data") or {}
    info = {
        "step": int(os.path.basename(step_dir)) if os.path.basename(step_dir).isdigit() else None,
        "directory": step_dir,
        "run_dir": os.path.dirname(os.path.dirname(step_dir)),
        "tokenizer": data.get("tokenizer", "byte"),
        "eos_token": data.get("eos_token"),
        "run_config": run_config,
    }
    return config, model, info
