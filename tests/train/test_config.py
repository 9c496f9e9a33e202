"""gin configuration: files, bindings, the --gin.X=Y shorthand, errors before any computation."""

import os
import subprocess
import sys

import pytest

from m1_jax.config import ConfigError
from m1_jax.train.config import UsageError, load_config, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_defaults_equal_tiny_gin():
    a, b = load_config([]), load_config(["configs/tiny.gin"])
    assert (a.train, a.data, a.optimizer, a.mesh, a.model) == (b.train, b.data, b.optimizer, b.mesh, b.model)
    assert a.model.vocab_size == 256 and a.train.steps > 0


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "m1-80k", "cispo_tiny", "cispo_small"])
def test_shipped_gin_files_validate(name):
    extra = ["DataConfig.source = '/data/x.jsonl'", "DataConfig.tokenizer = '/tok'"] if name == "m1-80k" else []
    run = load_config([name], extra)
    assert run.model.num_hidden_layers % run.model.layer_period == 0
    assert "TrainConfig.model = " in run.operative_gin and "OptimizerConfig.b2 = 0.95" in run.operative_gin
    if name.startswith("cispo"):  # RL: the M1 recipe's optimizer, a loss by name, a response that fits the answers
        assert run.train.mode == "rl" and run.rl is not None and run.rl.loss == "cispo"
        assert run.optimizer.eps <= 1e-12 and run.optimizer.b2 == 0.95
    else:
        assert run.rl is None
    if name == "m1-80k":
        assert run.mesh.expert == 8 and run.mesh.tensor == 8
        with pytest.raises(UsageError, match="DataConfig.source is required"):
            load_config([name])


def test_parse_args_shorthand_and_files():
    files, bindings, resume = parse_args(["--gin_file=configs/tiny.gin", "--gin_file", "small",
                                          "--gin_bindings=TrainConfig.steps = 3", "--gin.DataConfig.seq_len=64",
                                          "--resume"])
    assert files == ["configs/tiny.gin", "small"] and resume == "must"
    assert bindings == ["TrainConfig.steps = 3", "DataConfig.seq_len = 64"]
    run = load_config(files[:1], bindings + ["DataConfig.source = /some/path/*.txt"], resume)
    assert (run.train.steps, run.data.seq_len, run.data.source, run.train.resume) == (3, 64, "/some/path/*.txt", "must")
    with pytest.raises(UsageError, match="unknown argument"):
        parse_args(["--stepz=3"])


@pytest.mark.parametrize("binding, match", [
    ("TrainConfig.stepz = 3", "doesn't have a parameter named 'stepz'"),
    ("TrainConfg.steps = 3", "No configurable matching 'TrainConfg'"),
    ("MeshConfig.dat = 2", "doesn't have a parameter named 'dat'"),
    ("TrainConfig.steps = 0", "TrainConfig.steps = 0 is invalid"),
    ("OptimizerConfig.schedule = 'linear'", "OptimizerConfig.schedule"),
    ("DataConfig.batch_size = -1", "DataConfig.batch_size"),
    ("TrainConfig.model_overrides = {'hiden_size': 8}", "unknown ModelConfig fields \\['hiden_size'\\]"),
    ("TrainConfig.model_overrides = {'num_experts_per_tok': 9}", "num_experts_per_tok"),
    ("TrainConfig.model = 'huge'", "unknown preset 'huge'"),
    ("TrainConfig.microbatches = 3", r"TrainConfig.microbatches = 3 is invalid: expected a divisor of "
                                     r"DataConfig.batch_size = 16"),
    ("TrainConfig.microbatches = 0", "TrainConfig.microbatches = 0 is invalid"),
    ("TrainConfig.cast_params = 'int8'", "TrainConfig.cast_params = 'int8' is invalid"),
    ("TrainConfig.compilation_cache_dir = ' '", "TrainConfig.compilation_cache_dir = ' ' is invalid"),
])
def test_bad_bindings_fail_clearly(binding, match):
    with pytest.raises((UsageError, ConfigError, ValueError), match=match):
        load_config([], [binding])


def test_train_py_bad_config_exits_before_compute(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "train.py", "--gin.TrainConfig.stpes=3",
                          f"--gin.TrainConfig.run_dir={tmp_path}/r"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 2, out.stderr
    assert "doesn't have a parameter named 'stpes'" in out.stderr
    assert not os.path.exists(tmp_path / "r")  # nothing was started


@pytest.mark.parametrize("binding, match", [
    ("RLConfig.loss = 'reinforce'", "RLConfig.loss = 'reinforce' is invalid"),
    ("RLConfig.group_size = 1", "RLConfig.group_size = 1 is invalid: expected at least 2"),
    ("RLConfig.minibatches = 3", "RLConfig.minibatches = 3 is invalid: expected a divisor"),
    ("RLConfig.eps_high = -0.1", "RLConfig.eps_high"),
    ("RLConfig.reward_errors = 'ignore'", "RLConfig.reward_errors"),
    ("RLConfig.temperature = 0.0", "RLConfig.temperature"),
    ("TrainConfig.mode = 'sft'", "TrainConfig.mode = 'sft' is invalid"),
])
def test_bad_rl_bindings_fail_clearly(binding, match):
    with pytest.raises((UsageError, ConfigError, ValueError), match=match):
        load_config(["cispo_tiny"], [binding])


def test_rl_errors_before_any_run_folder(tmp_path):
    """Checks that need the task, the tokenizer or the init checkpoint fail before the run folder exists."""
    from m1_jax.train import main

    for binding in ("--gin.RLConfig.task=adition", "--gin.RLConfig.max_response_len=3",
                    f"--gin.RLConfig.init_checkpoint={tmp_path}/nothing", "--gin.RLConfig.stop_text=END"):
        assert main(["--gin_file=cispo_tiny", binding, f"--gin.TrainConfig.run_dir={tmp_path}/r"]) == 2, binding
        assert not os.path.exists(tmp_path / "r"), binding

