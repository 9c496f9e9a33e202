"""``m1-jax generate``: argument errors exit 2 with one line before anything loads; runs on a random preset
and on a checkpoint written by ``train.py`` (its text equals ``m1_jax.generate`` on the loaded model)."""

import os

import numpy as np
import pytest

from m1_jax.cli import generate as cli
from m1_jax.inference import compile_stats

TRAIN_BINDINGS = [
    "TrainConfig.model_overrides = {'num_hidden_layers': 2, 'layer_types': ('linear_attention', 'full_attention'), "
    "'block_size': 16, 'moe_impl': 'dense'}",
    "DataConfig.seq_len = 16", "DataConfig.batch_size = 2", "OptimizerConfig.warmup_steps = 1",
    "TrainConfig.steps = 1", "TrainConfig.checkpoint_every = 1", "TrainConfig.sample_tokens = 0",
    "TrainConfig.progress_bar = False", "TrainConfig.tensorboard = False", "TrainConfig.loss_chunk_size = 16",
]


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    from m1_jax.train.config import load_config
    from m1_jax.train.loop import train

    run_dir = str(tmp_path_factory.mktemp("train") / "run")
    result = train(load_config([], TRAIN_BINDINGS + [f"TrainConfig.run_dir = '{run_dir}'"]), verbose=False)
    assert result.status == "completed"
    return run_dir


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1; got 0"),
    (["--max-new-tokens", "-4"], "--max-new-tokens must be >= 1; got -4"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]; got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k must be >= 1; got 0"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    (["--max-new-tokens", "5000"], "exceeds the model's max_position_embeddings = 4096"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    before = compile_stats()["compiles"]
    rc, out, err = run_cli(capsys, "--preset", "tiny", "--prompt", "hello", *argv)
    assert rc == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1 and out == ""
    assert compile_stats()["compiles"] == before  # nothing ran


def test_bad_sources_exit_2(capsys, tmp_path):
    for argv, message in (
        (["--checkpoint", str(tmp_path)], "not a training checkpoint"),
        (["--checkpoint", str(tmp_path / "missing")], "no such folder"),
        (["--hf", str(tmp_path)], "not a HF checkpoint folder (no config.json)"),
        (["--preset", "huge"], "--preset must be one of"),
        (["--preset", "tiny", "--dtype", "int3"], "--dtype must be one of"),
    ):
        rc, out, err = run_cli(capsys, *argv, "--prompt", "hi")
        assert rc == 2 and message in err and err.count("\n") == 1, (argv, err)
    rc, _, err = run_cli(capsys, "--preset", "tiny", "--prompt", "")
    assert rc == 2 and "--prompt #1 encodes to no token" in err


def test_a_tokenizer_that_drops_characters_warns(capsys, tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={"h": 0, "i": 1, " ": 2}, merges=[]))  # no "!" and no unknown token
    tok.save(str(tmp_path / "tokenizer.json"))
    rc, _, err = run_cli(capsys, "--preset", "tiny", "--tokenizer", str(tmp_path / "tokenizer.json"),
                         "--prompt", "hi hi!", "--max-new-tokens", "5000")
    assert "warning" in err and "--prompt #1" in err  # then the prompt check stops it before any loading
    assert rc == 2


def test_runs_a_random_preset_and_reports_rates(capsys):
    rc, out, err = run_cli(capsys, "--preset", "tiny", "--prompt", "Hi", "--max-new-tokens", "5", "--stream-every", "2")
    assert rc == 0 and out.startswith("Hi")
    assert "[prefill: 2 tokens in" in err and "decode: 5 tokens in" in err and "excluded]" in err


def test_runs_a_training_checkpoint(capsys, training_run):
    from m1_jax import generate
    from m1_jax.convert import load_training_checkpoint

    rc, out, err = run_cli(capsys, "--checkpoint", training_run, "--prompt", "ab", "--prompt", "xyz",
                           "--max-new-tokens", "4", "--stream-every", "3")
    assert rc == 0, err
    _, model, info = load_training_checkpoint(training_run)
    assert info["tokenizer"] == "byte"
    ids = np.array([[0, 97, 98], [120, 121, 122]], np.int32)  # "ab" left-padded beside "xyz"
    tokens, _ = generate(model, ids, max_new_tokens=4, lengths=[2, 3])
    for prompt, row in zip(("ab", "xyz"), np.asarray(tokens)):
        text = bytes(int(t) for t in row).decode("utf-8", errors="replace")
        assert f"--- {prompt!r}\n{prompt}{text}\n" in out
    assert os.path.isdir(os.path.join(training_run, "checkpoints", "1"))
