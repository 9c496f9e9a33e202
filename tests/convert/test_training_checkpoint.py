"""Checkpoints written by ``train.py``: ``load_training_checkpoint`` and ``m1-jax convert orbax-to-hf`` from a
run folder, its checkpoints folder or a step folder."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import m1_jax
from m1_jax.convert import CheckpointError, cli, load_training_checkpoint


def saved_params(step_dir):
    """The step's parameters, restored independently: the whole train state as numpy, no target given."""
    state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {tuple(k.key for k in path[:-1]): np.asarray(v) for path, v in flat}  # drop the Variable's "value"


def model_params(model):
    return {tuple(str(k) for k in p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_every_folder_form_loads_the_right_step(training_run):
    ckpts = os.path.join(training_run, "checkpoints")
    step1, step2 = saved_params(os.path.join(ckpts, "1")), saved_params(os.path.join(ckpts, "2"))
    assert any(not np.array_equal(step1[k], step2[k]) for k in step1)  # training moved the parameters
    for path, step, want in ((training_run, 2, step2), (ckpts, 2, step2), (os.path.join(ckpts, "1"), 1, step1)):
        config, model, info = load_training_checkpoint(path)
        assert info["step"] == step and info["directory"] == os.path.join(ckpts, str(step))
        assert info["run_dir"] == training_run
        assert info["tokenizer"] == "byte" and info["eos_token"] is None
        assert info["run_config"]["data"]["seq_len"] == 16
        assert config.num_hidden_layers == 2 and config.layer_types == ("linear_attention", "full_attention")
        assert_bitwise(model_params(model), want)


def test_dtype_override_casts_every_parameter(training_run):
    config, model, _ = load_training_checkpoint(training_run, dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    got, want = model_params(model), saved_params(os.path.join(training_run, "checkpoints", "2"))
    assert {v.dtype for v in got.values()} >= {np.dtype(jnp.bfloat16)}
    for k, v in got.items():
        assert np.array_equal(v, want[k].astype(v.dtype)), k  # the router may stay float32; all else bf16


def test_info_reports_the_runs_tokenizer(training_run, tmp_path):
    step = tmp_path / "checkpoints" / "7"
    shutil.copytree(os.path.join(training_run, "checkpoints", "2"), step)
    meta_file = step / "config" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["data"].update(tokenizer="/models/m1/tokenizer.json", eos_token="</s>")
    meta_file.write_text(json.dumps(meta))
    _, _, info = load_training_checkpoint(str(tmp_path))
    assert info["step"] == 7 and info["tokenizer"] == "/models/m1/tokenizer.json" and info["eos_token"] == "</s>"


def test_not_a_checkpoint_says_what_was_expected(training_run, tmp_path):
    def expect(path, *fragments, **kw):
        with pytest.raises(CheckpointError) as e:
            load_training_checkpoint(str(path), **kw)
        for f in (str(path), *fragments):
            assert f in str(e.value), str(e.value)

    expect(tmp_path / "missing", "no such folder", "run_dir/checkpoints/<step>")
    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", "not a training checkpoint", "state/ and config/")
    (tmp_path / "file.txt").write_text("x")
    expect(tmp_path / "file.txt", "is a file")
    (tmp_path / "run" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an unfinished save
    expect(tmp_path / "run", "holds no finished checkpoint")
    with pytest.raises(CheckpointError, match=r"dtype = 'int8': expected one of"):
        load_training_checkpoint(training_run, dtype="int8")

    bad = tmp_path / "bad" / "3"
    shutil.copytree(os.path.join(training_run, "checkpoints", "2"), bad)
    (bad / "config" / "metadata").write_text("{not json")
    expect(bad, "cannot read the run's config")
    meta = json.loads(open(os.path.join(training_run, "checkpoints", "2", "config", "metadata")).read())
    meta["config"]["model"]["vocab_size"] = 300  # a config that does not describe the saved arrays
    (bad / "config" / "metadata").write_text(json.dumps(meta))
    expect(bad / "state", "not a training checkpoint")
    with pytest.raises(CheckpointError, match=r"state: cannot restore the parameters"):
        load_training_checkpoint(str(bad))


def test_orbax_to_hf_from_a_training_run(training_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli.main(["orbax-to-hf", training_run, str(out), "--quiet", "--max-shard-size", "200KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    config, model = m1_jax.load_hf_checkpoint(str(out))
    trained, _, _ = load_training_checkpoint(training_run)
    assert config == trained
    assert_bitwise(model_params(model), saved_params(os.path.join(training_run, "checkpoints", "2")))

    assert cli.main(["orbax-to-hf", os.path.join(training_run, "checkpoints", "1"), "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "checkpoints/1: OK" in report and "2 layers (1 lightning, 1 softmax)" in report
    assert "(1 scanned block of 2 layers)" in report and "a training checkpoint: the parameters of step 1" in report

    assert cli.main(["orbax-to-hf", str(tmp_path), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "not an Orbax checkpoint" in err and "training checkpoint" in err
