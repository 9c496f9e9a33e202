"""``--dry-run``: check a checkpoint against the key table and its config without reading weights."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
from flax import nnx

from m1_jax.config import FULL, ModelConfig
from m1_jax.convert.errors import CheckpointError
from m1_jax.convert.hf_import import plan_import
from m1_jax.convert.safetensors_io import SafetensorsFolder
from m1_jax.convert.wording import count
from m1_jax.model import abstract_model


@dataclasses.dataclass
class Report:
    source: str
    config: ModelConfig
    num_tensors: int  # HF tensors the table maps
    num_leaves: int  # our parameters (stacked)
    num_params: int  # from jax.eval_shape of the model
    checked: str  # what was checked beyond the keys
    dropped: int = 0
    notes: tuple[str, ...] = ()
    dtype: str | None = None  # shown instead of config.param_dtype when that is only a default

    def text(self) -> str:
        c = self.config
        n_full = sum(t == FULL for t in c.layer_types)
        lines = [
            f"{self.source}: OK",
            f"  config: {c.num_hidden_layers} layers ({c.num_hidden_layers - n_full} lightning, {n_full} softmax), "
            f"hidden {c.hidden_size}, {c.num_attention_heads} heads x {c.head_dim}, {c.num_key_value_heads} kv heads, "
            f"{c.num_local_experts} experts x {c.intermediate_size} (top-{c.num_experts_per_tok}), vocab {c.vocab_size}, "
            f"rotary_dim {c.rotary_dim}, param dtype {self.dtype or c.param_dtype}",
            f"  {count(self.num_tensors, 'tensor')} map onto {count(self.num_leaves, 'parameter')} "
            f"({count(c.num_blocks, 'scanned block')} of {count(c.layer_period, 'layer')})",
            f"  {count(self.num_params, 'parameter')} ({_short(self.num_params)})",
        ]
        if self.dropped:
            lines.append(f"  {count(self.dropped, 'derived HF decay buffer')} will be dropped")
        lines.append(f"  {self.checked}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(n: int) -> str:
    return next((f"{n / d:.1f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if n >= d), str(n))


def abstract_param_count(config: ModelConfig) -> tuple[int, int]:
    """``(number of parameter leaves, number of parameters)`` via ``jax.eval_shape`` (nothing allocated)."""
    _, state = abstract_model(config)
    leaves = jax.tree.leaves(state)
    return len(leaves), sum(math.prod(x.shape) for x in leaves)


def dry_run_hf(src: str, dtype: str | None = None) -> Report:
    folder = SafetensorsFolder(src, headers=False)
    missing = folder.missing_files()
    headers = len(missing) < len(folder.files)
    if headers and missing:
        raise CheckpointError(f"{src}: {len(missing)} of the {count(len(folder.files), 'weight file')} named in the "
                              f"index {'does' if len(missing) == 1 else 'do'} not exist, e.g. "
                              f"{os.path.basename(missing[0])!r}")
    plan = plan_import(src, dtype=dtype, headers=headers)
    n_leaves, n_params = abstract_param_count(plan.config)
    if n_params != plan.num_params:
        raise CheckpointError(f"{src}: the key table covers {plan.num_params:,} parameters but the model has "
                              f"{n_params:,}")
    notes = []
    if plan.config.rotary_dim != plan.config.head_dim:
        notes.append(f"rotary_dim {plan.config.rotary_dim} < head_dim {plan.config.head_dim}: transformers' "
                     f"built-in MiniMax ignores rotary_dim (rotates the whole head)")
    checked = ("shapes and dtypes checked from the safetensors headers" if headers else
               "weight files absent: checked config.json and the index keys only (no shapes)")
    cfg = folder.config
    dtype_text = None
    if not headers and dtype is None and not (cfg.get("torch_dtype") or cfg.get("dtype")):
        dtype_text = "unknown (config.json has no torch_dtype; a conversion takes it from the weights)"
    return Report(src, plan.config, len(plan.key_map), n_leaves, n_params, checked, len(plan.dropped),
                  tuple(notes), dtype_text)


def dry_run_orbax(src: str) -> Report:
    from m1_jax.convert.orbax_io import check_orbax

    config, meta = check_orbax(src)
    n_leaves, n_params = abstract_param_count(config)
    from m1_jax.convert.mapping import hf_key_map

    notes = ()
    if meta.get("_training_step_dir"):
        notes = (f"a training checkpoint: the parameters of step {os.path.basename(meta['_training_step_dir'])} "
                 f"({meta['_training_step_dir']}); the optimizer state is not converted",)
    return Report(src, config, len(hf_key_map(config)), n_leaves, n_params,
                  "parameter shapes checked from the zarr metadata", notes=notes)
