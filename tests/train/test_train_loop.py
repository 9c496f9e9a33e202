"""The training loop: exact resume (step limit, a lost checkpoint, and a SIGTERM-killed subprocess), metrics
without replayed duplicates, the stop_after message, non-finite handling (bitwise-kept state), the sample."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from m1_jax.train import main
from m1_jax.train.checkpoint import Checkpointer
from m1_jax.train.config import load_config
from m1_jax.train.loop import NonFiniteError, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Two layers (one lightning, one softmax) keep compilation short; everything else is the real path.
SMALL = [
    "TrainConfig.model_overrides = {'num_hidden_layers': 2, 'layer_types': ('linear_attention', 'full_attention'), "
    "'block_size': 16}",
    "DataConfig.seq_len = 32", "DataConfig.batch_size = 4", "OptimizerConfig.warmup_steps = 2",
    "TrainConfig.log_every = 1", "TrainConfig.sample_tokens = 0", "TrainConfig.progress_bar = False",
    "TrainConfig.tensorboard = False", "TrainConfig.loss_chunk_size = 48",
]


def _run(tmp, name, *extra):
    return load_config([], SMALL + [f"TrainConfig.run_dir = '{tmp}/{name}'", *extra])


def _restore(run_dir, step):
    ck = Checkpointer(str(run_dir), keep=10)
    try:
        state, _, _ = ck.restore(step, None)
    finally:
        ck.close()
    return jax.tree.map(np.asarray, state)


def _steps(run_dir):
    return sorted(int(p) for p in os.listdir(run_dir / "checkpoints") if p.isdigit())


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_is_exact_and_checkpoint_holds_everything(tmp_path, capsys):
    full = train(_run(tmp_path, "full", "TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 4",
                      "TrainConfig.sample_tokens = 6", "TrainConfig.sample_temperature = 0.0"), verbose=False)
    assert full.status == "completed" and sorted(full.losses) == list(range(8))
    assert full.losses[7] < full.losses[0]
    assert full.sample.startswith("ROMEO:") and len(full.sample.encode("utf-8", "replace")) >= len("ROMEO:") + 1
    part = train(_run(tmp_path, "part", "TrainConfig.steps = 8", "TrainConfig.stop_after = 4",
                      "TrainConfig.checkpoint_every = 3"), verbose=True)
    out = capsys.readouterr().out
    assert part.status == "stopped" and part.step == 4 and part.checkpoint_step == 4
    assert "stopped at step 4 of 8 (TrainConfig.stop_after = 4)" in out and "To continue" in out, out
    # A kill before checkpoint 4 committed: steps 4 was logged but the run resumes from 3 and replays it.
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "4")
    os.remove(tmp_path / "part" / "checkpoints" / "4.gin")
    rest = train(_run(tmp_path, "part", "TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 3"),
                 verbose=False)
    assert rest.status == "completed" and sorted(rest.losses) == [3, 4, 5, 6, 7]
    for s in range(8):  # bitwise: same data order, same params, same optimizer state
        got = part.losses[s] if s < 3 else rest.losses[s]
        assert got == full.losses[s], (s, got, full.losses[s])
    ckdir = tmp_path / "part" / "checkpoints"
    assert _steps(tmp_path / "part") == [3, 6, 8]  # keep_checkpoints = 3
    assert sorted(p for p in os.listdir(ckdir) if p.endswith(".gin")) == ["3.gin", "6.gin", "8.gin"]
    assert (ckdir / "8.gin").read_text().count("TrainConfig.steps = 8") == 1
    assert "DataConfig.seq_len = 32" in (tmp_path / "part" / "config.gin").read_text()
    for item in ("state", "data", "config"):
        assert (ckdir / "8" / item).is_dir()
    lines = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == list(range(1, 9))  # the replayed step 4 appears once
    assert [l["loss"] for l in lines] == [full.losses[s] for s in range(8)]
    for k in ("loss", "aux_loss", "grad_norm", "lr", "moe/max_load", "perf/tokens_per_s", "perf/steps_per_s",
              "perf/tflops_per_device", "nonfinite_total"):
        assert k in lines[-1], k
    # Already complete: nothing to do, and the message says so.
    again = train(_run(tmp_path, "part", "TrainConfig.steps = 8"), verbose=True)
    assert again.status == "already_complete" and again.step == 8
    assert "the run is complete (step 8 of 8)" in capsys.readouterr().out


def test_microbatches_and_cast_params_reach_the_step(tmp_path):
    """TrainConfig.microbatches / cast_params go through to the step: 2 microbatches give the losses of one
    batch (the same token-weighted mean), a bf16 parameter cast changes them at bf16 rounding."""
    steps = ["TrainConfig.steps = 2", "TrainConfig.checkpoint_every = 100"]
    plain = train(_run(tmp_path, "mb1", *steps), verbose=False).losses
    accum = train(_run(tmp_path, "mb2", *steps, "TrainConfig.microbatches = 2"), verbose=False).losses
    cast = train(_run(tmp_path, "cast", *steps, "TrainConfig.cast_params = 'bfloat16'"), verbose=False).losses
    np.testing.assert_allclose([accum[s] for s in (0, 1)], [plain[s] for s in (0, 1)], rtol=2e-5)
    assert 1e-6 < abs(cast[0] - plain[0]) < 5e-2 * abs(plain[0])


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    # Step 2's loss and gradients are NaN: params and optimizer state after it equal those before it, bitwise.
    res = train(_run(tmp_path, "nf", "TrainConfig.steps = 4", "TrainConfig.fault_steps = (2,)",
                     "TrainConfig.checkpoint_every = 1", "TrainConfig.keep_checkpoints = 5",
                     "TrainConfig.tensorboard = True"), verbose=False)
    assert res.status == "completed" and res.nonfinite_total == 1
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "nf" / "tb"))
    assert np.isnan(res.losses[2]) and all(np.isfinite(res.losses[s]) for s in (0, 1, 3))
    before, after, later = (_restore(tmp_path / "nf", s) for s in (2, 3, 4))
    _assert_same(before["params"], after["params"])
    _assert_same(before["opt_state"], after["opt_state"])
    assert int(after["step"]) == 3 and int(after["nonfinite_total"]) == 1 and int(after["nonfinite_streak"]) == 1
    assert int(later["nonfinite_streak"]) == 0
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(later["params"]))]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(later["params"])) and any(moved)


def test_consecutive_nonfinite_stop_keeps_last_good_checkpoint(tmp_path):
    cfg = _run(tmp_path, "stop", "TrainConfig.steps = 12", "TrainConfig.checkpoint_every = 1",
               "TrainConfig.fault_steps = (3, 4, 5, 6, 7, 8)", "TrainConfig.max_consecutive_nonfinite = 3")
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(up to step 5\).*checkpoint \(5\) is intact"):
        train(cfg, verbose=False)
    assert _steps(tmp_path / "stop") == [3, 4, 5]  # nothing was saved after the stop
    good, *faulted = (_restore(tmp_path / "stop", s) for s in (3, 4, 5))
    for st in faulted:  # the faulted steps kept the last good params and optimizer state, bitwise
        _assert_same(good["params"], st["params"])
        _assert_same(good["opt_state"], st["opt_state"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(good["params"]))
    assert int(faulted[-1]["nonfinite_total"]) == 2 and int(faulted[-1]["nonfinite_streak"]) == 2


def test_bad_data_file_leaves_no_run_folder(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main([f"--gin.DataConfig.source={empty}", f"--gin.TrainConfig.run_dir={tmp_path}/run",
                 "--gin.TrainConfig.steps=2"])
    assert code == 2
    assert str(empty) in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
    # A long schedule, so the run is surely still going when SIGTERM arrives; the resumed and the
    # reference runs keep that schedule and stop early (stop_after) a few steps past the kill.
    total = 5000
    run_dir = tmp_path / "killed"
    args = [sys.executable, "train.py", *[f"--gin_bindings={b}" for b in SMALL],
            f"--gin.TrainConfig.steps={total}", "--gin.TrainConfig.checkpoint_every=100000",
            f"--gin.TrainConfig.run_dir={run_dir}", f"--gin.TrainConfig.compilation_cache_dir={tmp_path}/xla"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    deadline = time.time() + 1800  # only a guard against a hung run: the wait is for the step marker
    while logged() < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if logged() < 3:
        proc.kill()
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"train.py never logged step 3 (exit code {proc.returncode}, {logged()} metrics lines); "
                    f"its output:\n{out[-3000:]}")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    assert any(f.endswith("-cache") for f in os.listdir(tmp_path / "xla")), "the compiled step was not cached"
    steps = _steps(run_dir)
    assert len(steps) == 1 and 3 <= steps[0] < total
    k = steps[0]
    end = k + 2
    # Resume in-process a few steps past the kill, and compare with an uninterrupted in-process run.
    common = SMALL + [f"TrainConfig.steps = {total}", f"TrainConfig.stop_after = {end}"]
    rest = train(load_config([], common + [f"TrainConfig.run_dir = '{run_dir}'"]), verbose=False)
    full = train(load_config([], common + [f"TrainConfig.run_dir = '{tmp_path}/ref'"]), verbose=False)
    assert sorted(rest.losses) == list(range(k, end))
    killed = {json.loads(l)["step"] - 1: json.loads(l)["loss"] for l in metrics.read_text().splitlines()[:k]}
    for s in range(end):
        got = rest.losses[s] if s >= k else killed.get(s)
        if got is not None:
            assert got == full.losses[s], (s, got, full.losses[s])
