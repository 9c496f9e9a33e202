"""Pretraining: configs (gin over dataclasses), optimizer, chunked loss, train step, loop, checkpoints.

``python train.py`` (repo root) is the entry point; ``m1_jax.train.main(argv)`` is the same in Python.
Submodules import lazily: ``m1_jax.train.step``, ``.loss`` and ``.optimizer`` need neither gin nor
Grain (the benchmarks run on machines without them).
"""

import importlib

_LAZY = {
    "RunConfig": "config", "TrainConfig": "config", "UsageError": "config", "config_from_argv": "config",
    "load_config": "config", "NonFiniteError": "loop", "RunResult": "loop", "train": "loop",
    "chunked_cross_entropy": "loss", "OptimizerConfig": "optimizer", "make_optimizer": "optimizer",
    "make_schedule": "optimizer",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"m1_jax.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'm1_jax.train' has no attribute {name!r}")


def main(argv=None) -> int:
    """``train.py``: parse flags and gin, train (or RL with ``TrainConfig.mode = 'rl'``); returns the exit code
    (2: bad config, 3: non-finite stop, 4: a reward function failed)."""
    import sys

    from m1_jax.config import ConfigError
    from m1_jax.train.config import UsageError, config_from_argv
    from m1_jax.train.loop import NonFiniteError, train

    try:
        run = config_from_argv(argv)
    except (UsageError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    if run.train.mode == "rl":
        from m1_jax.rl.loop import train_rl as train
    from m1_jax.rl.rewards import RewardError

    try:
        train(run)
    except (ConfigError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    except RewardError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 4
    return 0


__all__ = sorted(_LAZY) + ["main"]
