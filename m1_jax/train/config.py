"""Run configuration: frozen dataclasses bound by gin, plus the command-line parsing of ``train.py``.

Configurable classes (the whole gin surface, nothing else is registered):

* ``TrainConfig``  — model preset + overrides, steps, run folder, logging, checkpoints, mesh, loss.
* ``DataConfig``   — ``m1_jax.data.DataConfig``.
* ``OptimizerConfig`` — ``m1_jax.train.optimizer.OptimizerConfig``.
* ``MeshConfig``   — ``sharding.MeshConfig`` (axis sizes ``data, fsdp, expert, context, tensor``).
* ``RLConfig``     — ``m1_jax.rl.config.RLConfig`` (used when ``TrainConfig.mode = 'rl'``).

Command line: ``--gin_file=PATH`` (repeatable; a bare name such as ``small`` means ``configs/small.gin``),
``--gin_bindings='TrainConfig.steps = 10'`` (repeatable), the shorthand ``--gin.TrainConfig.steps=10``,
``--resume`` (require a checkpoint to resume from) and ``--no_resume`` (start fresh; refuses a run folder
that already holds checkpoints). Files are applied first, then bindings in order. An unknown class or
field, or a value of the wrong kind, fails before anything is computed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import gin

import sharding
from m1_jax.config import ConfigError, ModelConfig, require
from m1_jax.data.pipeline import DataConfig
from m1_jax.rl.config import RLConfig
from m1_jax.train.optimizer import OptimizerConfig

# Classes defined without gin (so the model, the train step and the benchmarks import without it) are
# registered here; call these wrappers (not the plain classes) to get the bound values.
MeshConfig = gin.external_configurable(sharding.MeshConfig, name="MeshConfig")
_DataConfig = gin.external_configurable(DataConfig, name="DataConfig")
_OptimizerConfig = gin.external_configurable(OptimizerConfig, name="OptimizerConfig")
_RLConfig = gin.external_configurable(RLConfig, name="RLConfig")

RESUME_MODES = ("auto", "must", "never")
MODES = ("pretrain", "rl")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    ``mode``: ``pretrain`` (next-token prediction on ``DataConfig``) or ``rl`` (RL fine-tuning, ``RLConfig``).
    ``model``: a ``ModelConfig`` preset name; ``model_overrides``: a dict of ``ModelConfig`` fields.
    ``steps``: total optimizer steps (the schedule's length); ``stop_after``: stop this invocation
    after that many steps in total (a resumable partial run), ``None`` = run to ``steps``.
    ``run_dir``: checkpoints (``run_dir/checkpoints``), TensorBoard events (``run_dir/tb``),
    ``metrics.jsonl`` and ``config.gin``. ``resume``: ``auto`` (resume when ``run_dir`` has a checkpoint),
    ``must`` (fail without one), ``never`` (fail if one exists).
    ``head_dtype``: operand dtype of the LM-head matmul in the loss (accumulation is always float32).
    ``use_segment_ids``: pass the packing segment ids to the model (document-separated attention).
    ``microbatches``: gradient accumulation: each step's batch (``DataConfig.batch_size`` rows) in that many
    microbatches, one optimizer update per step (the activation memory of one microbatch).
    ``cast_params``: ``None`` (every layer casts its float32 weights at use) or ``'bfloat16'`` (the parameter
    tree cast once per step; the LM head stays float32 when ``head_dtype`` is float32).
    ``fault_steps``: steps (RL: optimizer updates) whose loss and gradients are NaN (tests of the non-finite
    handling).
    ``compilation_cache_dir``: a folder for XLA's persistent compilation cache (``~`` expanded), so that a
    relaunch or a resume of the same programs loads them instead of compiling again; ``None``: off.
    """

    mode: str = "pretrain"
    model: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    steps: int = 200
    stop_after: int | None = None
    seed: int = 0
    run_dir: str = "runs/tiny"
    resume: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    max_consecutive_nonfinite: int = 5
    loss_chunk_size: int = 2048
    head_dtype: str = "float32"
    use_segment_ids: bool = True
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    progress_bar: bool = True
    tensorboard: bool = True
    peak_tflops: float | None = None
    microbatches: int = 1
    cast_params: str | None = None
    fault_steps: tuple = ()
    compilation_cache_dir: str | None = None

    def validate(self) -> None:
        def need(cond, field, expected):
            require(cond, self, field, expected)

        need(isinstance(self.steps, int) and self.steps > 0, "steps", "a positive integer")
        need(self.stop_after is None or (isinstance(self.stop_after, int) and 0 < self.stop_after <= self.steps),
             "stop_after", f"None or an integer in [1, steps = {self.steps}]")
        need(self.resume in RESUME_MODES, "resume", f"one of {RESUME_MODES}")
        need(self.mode in MODES, "mode", f"one of {MODES}")
        for f in ("log_every", "checkpoint_every", "keep_checkpoints", "max_consecutive_nonfinite",
                  "loss_chunk_size"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "a positive integer")
        need(isinstance(self.sample_tokens, int) and self.sample_tokens >= 0, "sample_tokens", "an integer >= 0")
        need(self.head_dtype in ("float32", "bfloat16"), "head_dtype", "'float32' or 'bfloat16'")
        need(isinstance(self.model_overrides, dict), "model_overrides", "a dict of ModelConfig fields")
        need(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "None or a positive number")
        need(isinstance(self.run_dir, str) and self.run_dir, "run_dir", "a folder path")
        need(isinstance(self.microbatches, int) and self.microbatches > 0, "microbatches", "a positive integer")
        need(self.cast_params in (None, "bfloat16", "float32"), "cast_params", "None, 'bfloat16' or 'float32'")
        need(self.compilation_cache_dir is None or (isinstance(self.compilation_cache_dir, str)
                                                    and self.compilation_cache_dir.strip()),
             "compilation_cache_dir", "None or a folder path")

    def model_config(self) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        bad = sorted(set(self.model_overrides) - fields)
        if bad:
            raise ConfigError(f"TrainConfig.model_overrides has unknown ModelConfig fields {bad}; "
                              f"known fields: {sorted(fields)}")
        return ModelConfig.preset(self.model, **self.model_overrides)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, built from the parsed gin config (and validated)."""

    train: TrainConfig
    data: DataConfig
    optimizer: OptimizerConfig
    mesh: sharding.MeshConfig
    model: ModelConfig
    operative_gin: str
    rl: RLConfig | None = None  # set when train.mode == "rl"


# ----------------------------------------------------------------------------------------------- CLI
USAGE = """usage: python train.py [--gin_file=FILE ...] [--gin_bindings='Class.field = value' ...]
                         [--gin.Class.field=value ...] [--resume | --no_resume]
   or: m1-jax train (the same arguments)

With no arguments: the tiny preset on the bundled Shakespeare corpus, on the CPU (configs/tiny.gin
restates these defaults). Configurable: TrainConfig, DataConfig, OptimizerConfig, MeshConfig, RLConfig.
Examples:
  python train.py --gin_file=configs/small.gin --gin.TrainConfig.steps=1000
  python train.py --gin_file=configs/cispo_tiny.gin                 # RL fine-tuning (CISPO), CPU, minutes
  python train.py --gin.DataConfig.source=/data/corpus/*.jsonl --gin.TrainConfig.run_dir=runs/x
"""


class UsageError(ValueError):
    """Bad command line or gin configuration (reported before any computation)."""


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """``argv`` -> (gin files, gin binding strings, resume override)."""
    files: list[str] = []
    bindings: list[str] = []
    resume = None
    args = list(argv)
    i = 0

    def value(flag: str, arg: str) -> str:
        nonlocal i
        if "=" in arg:
            return arg.split("=", 1)[1]
        if i + 1 >= len(args):
            raise UsageError(f"{flag} needs a value")
        i += 1
        return args[i]

    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            raise SystemExit(print(USAGE) or 0)
        if a == "--resume":
            resume = "must"
        elif a == "--no_resume":
            resume = "never"
        elif a.startswith("--gin_file"):
            files.extend(f for f in value("--gin_file", a).split(",") if f)
        elif a.startswith("--gin_bindings"):
            bindings.append(value("--gin_bindings", a))
        elif a.startswith("--gin."):
            body = a[len("--gin."):]
            if "=" not in body:
                raise UsageError(f"{a!r}: expected --gin.Class.field=value")
            name, val = body.split("=", 1)
            bindings.append(f"{name} = {val}")
        else:
            raise UsageError(f"unknown argument {a!r}\n\n{USAGE}")
        i += 1
    return files, bindings, resume


def _repo_configs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def resolve_gin_file(name: str) -> str:
    if os.path.isfile(name):
        return name
    for cand in (os.path.join(_repo_configs_dir(), name), os.path.join(_repo_configs_dir(), name + ".gin")):
        if os.path.isfile(cand):
            return cand
    raise UsageError(f"--gin_file {name!r}: no such file (also looked in {_repo_configs_dir()})")


def _looks_like_string(v: str) -> bool:
    v = v.strip()
    if not v or v[0] in "'\"[({%@-+.0123456789" or v in ("True", "False", "None"):
        return False
    return True


def _quote_bare_strings(binding: str) -> str:
    """``--gin.DataConfig.source=/data/x.txt`` -> ``DataConfig.source = '/data/x.txt'`` (a value gin cannot
    parse as a literal and that is not a reference is taken as a string, as t5x does)."""
    if "=" not in binding:
        return binding
    name, val = binding.split("=", 1)
    if _looks_like_string(val):
        import ast

        try:
            ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            return f"{name.strip()} = {val.strip()!r}"
    return binding


def load_config(files: Sequence[str] = (), bindings: Sequence[str] = (), resume: str | None = None,
                process_count: int = 1) -> RunConfig:
    """Parse gin files and bindings, build and validate every config. Raises ``UsageError`` /
    ``ConfigError`` / ``ValueError`` with the field named; never touches an accelerator."""
    gin.clear_config()
    try:
        paths = [resolve_gin_file(f) for f in files]
        gin.parse_config_files_and_bindings(paths, [_quote_bare_strings(b) for b in bindings],
                                            finalize_config=False, skip_unknown=False)
    except UsageError:
        raise
    except Exception as e:  # gin raises ValueError/KeyError/SyntaxError with its own wording
        raise UsageError(f"bad gin configuration: {e}\nconfigurable: TrainConfig, DataConfig, OptimizerConfig, "
                         "MeshConfig, RLConfig (fields: see docs/training.md and docs/rl.md)") from None
    try:
        train = TrainConfig()
        if resume is not None:
            train = dataclasses.replace(train, resume=resume)
        data = _DataConfig()
        opt = _OptimizerConfig()
        mesh = MeshConfig()
        rl = _RLConfig()
    except TypeError as e:
        raise UsageError(f"bad gin configuration: {e}") from None
    for obj in (train, data, opt, mesh, rl):
        for f in dataclasses.fields(obj):
            if getattr(obj, f.name) is gin.REQUIRED:
                raise UsageError(f"{type(obj).__name__}.{f.name} is required by the gin files "
                                 f"{list(files)}: set it with --gin.{type(obj).__name__}.{f.name}=...")
    train.validate()
    data.validate(process_count)
    require(train.mode != "rl" or (train.microbatches == 1 and train.cast_params is None), train,
            "microbatches" if train.microbatches != 1 else "cast_params",
            "its default in RL mode (the RL update splits its rows by RLConfig.minibatches)")
    require(train.mode == "rl" or data.batch_size % (train.microbatches * process_count) == 0, train,
            "microbatches", f"a divisor of DataConfig.batch_size = {data.batch_size} that leaves every process "
            f"({process_count}) whole rows in each microbatch")
    if train.mode == "rl":
        rl.validate()
        opt.validate(rl.updates(train.steps))
    else:
        rl = None
        opt.validate(train.steps)
    model = train.model_config()
    if data.tokenizer == "byte" and model.vocab_size < 256:
        raise ConfigError(f"the byte tokenizer needs ModelConfig.vocab_size >= 256; got {model.vocab_size}")
    operative = gin.operative_config_str()
    return RunConfig(train=train, data=data, optimizer=opt, mesh=mesh, model=model, operative_gin=operative, rl=rl)


def config_from_argv(argv: Sequence[str] | None = None) -> RunConfig:
    files, bindings, resume = parse_args(sys.argv[1:] if argv is None else argv)
    return load_config(files, bindings, resume)


def as_dict(cfg: RunConfig) -> dict[str, Any]:
    out = {"train": dataclasses.asdict(cfg.train), "data": dataclasses.asdict(cfg.data),
           "optimizer": dataclasses.asdict(cfg.optimizer), "mesh": dataclasses.asdict(cfg.mesh),
           "model": dataclasses.asdict(cfg.model)}
    if cfg.rl is not None:
        out["rl"] = dataclasses.asdict(cfg.rl)
    return out
