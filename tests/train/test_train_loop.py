"""The training loop: exact resume (step limit, and a killed subprocess), non-finite handling,
checkpoint contents, metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

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


def test_resume_is_exact_and_checkpoint_holds_everything(tmp_path):
    full = train(_run(tmp_path, "full", "TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 4"),
                 verbose=False)
    assert full.status == "completed" and sorted(full.losses) == list(range(8))
    assert full.losses[7] < full.losses[0]
    part = train(_run(tmp_path, "part", "TrainConfig.steps = 8", "TrainConfig.stop_after = 4",
                      "TrainConfig.checkpoint_every = 3"), verbose=False)
    assert part.status == "stopped" and part.step == 4 and part.checkpoint_step == 4
    rest = train(_run(tmp_path, "part", "TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 3"),
                 verbose=False)
    assert rest.status == "completed" and sorted(rest.losses) == [4, 5, 6, 7]
    for s in range(8):  # bitwise: same data order, same params, same optimizer state
        got = part.losses[s] if s < 4 else rest.losses[s]
        assert got == full.losses[s], (s, got, full.losses[s])
    ckdir = tmp_path / "part" / "checkpoints"
    steps = sorted(int(p) for p in os.listdir(ckdir) if p.isdigit())
    assert steps == [4, 6, 8]  # keep_checkpoints = 3
    assert (ckdir / "8.gin").read_text().count("TrainConfig.steps = 8") == 1
    assert "DataConfig.seq_len = 32" in (tmp_path / "part" / "config.gin").read_text()
    for item in ("state", "data", "config"):
        assert (ckdir / "8" / item).is_dir()
    lines = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    keys = set(lines[-1])
    for k in ("loss", "aux_loss", "grad_norm", "lr", "moe/max_load", "perf/tokens_per_s", "perf/steps_per_s",
              "perf/tflops_per_device", "nonfinite_total"):
        assert k in keys, k
    # Already complete: nothing to do.
    again = train(_run(tmp_path, "part", "TrainConfig.steps = 8"), verbose=False)
    assert again.status == "already_complete" and again.step == 8


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    res = train(_run(tmp_path, "nf", "TrainConfig.steps = 5", "TrainConfig.fault_steps = (1, 3)",
                     "TrainConfig.tensorboard = True"), verbose=False)
    assert res.status == "completed" and res.nonfinite_total == 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "nf" / "tb"))
    assert np.isnan(res.losses[1]) and np.isnan(res.losses[3]) and np.isfinite(res.losses[4])


def test_consecutive_nonfinite_stop_keeps_last_good_checkpoint(tmp_path):
    cfg = _run(tmp_path, "stop", "TrainConfig.steps = 12", "TrainConfig.checkpoint_every = 2",
               "TrainConfig.fault_steps = (3, 4, 5, 6, 7, 8)", "TrainConfig.max_consecutive_nonfinite = 3")
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        train(cfg, verbose=False)
    ckdir = tmp_path / "stop" / "checkpoints"
    steps = sorted(int(p) for p in os.listdir(ckdir) if p.isdigit())
    assert max(steps) <= 4
    # The saved state is finite and loads (the resumed run hits the faults again and stops again).
    from m1_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path / "stop"), keep=3)
    st, data, _ = ck.restore(max(steps), None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(st["params"]))
    assert int(st["nonfinite_total"]) <= 1
    ck.close()


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
    # A long schedule, so the run is surely still going when SIGTERM arrives; the resumed and the
    # reference runs keep that schedule and stop early (stop_after) a few steps past the kill.
    total = 5000
    run_dir = tmp_path / "killed"
    args = [sys.executable, "train.py", *[f"--gin_bindings={b}" for b in SMALL],
            f"--gin.TrainConfig.steps={total}", "--gin.TrainConfig.checkpoint_every=100000",
            f"--gin.TrainConfig.run_dir={run_dir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    ckdir = run_dir / "checkpoints"
    steps = sorted(int(p) for p in os.listdir(ckdir) if p.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < total
    k = steps[0]
    end = k + 5
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
