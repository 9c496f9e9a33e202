"""Pretraining: configs (gin over dataclasses), optimizer, chunked loss, train step, loop, checkpoints.

``python train.py`` (repo root) is the entry point; ``m1_jax.train.main(argv)`` is the same in Python.
"""

from m1_jax.train.config import RunConfig, TrainConfig, UsageError, config_from_argv, load_config
from m1_jax.train.loop import NonFiniteError, RunResult, train
from m1_jax.train.loss import chunked_cross_entropy
from m1_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule


def main(argv=None) -> int:
    import sys

    from m1_jax.config import ConfigError

    try:
        run = config_from_argv(argv)
    except (UsageError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        train(run)
    except (ConfigError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    return 0


__all__ = ["NonFiniteError", "OptimizerConfig", "RunConfig", "RunResult", "TrainConfig", "UsageError",
           "chunked_cross_entropy", "config_from_argv", "load_config", "main", "make_optimizer", "make_schedule",
           "train"]
