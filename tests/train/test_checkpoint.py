"""The checkpoint writer: the <step>.gin exists before the checkpoint commits; stale ones are removed;
finished_steps ignores uncommitted folders; metrics.jsonl is trimmed to the restored step."""

import json
import os

import jax.numpy as jnp
import numpy as np

from m1_jax.train.checkpoint import Checkpointer, finished_steps
from m1_jax.train.setup import trim_metrics


def _state(v):
    return {"params": {"w": jnp.full((3, 2), v, jnp.float32)}, "step": jnp.asarray(v, jnp.int32)}


def test_gin_is_written_before_the_checkpoint_commits(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=2, async_save=True)
    meta = {"operative_gin": "TrainConfig.steps = 7\n", "config": {}}
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"pos": step}, meta, force=True)
        # Right after save() returns the arrays may still be in flight, the .gin is already complete.
        assert (tmp_path / "checkpoints" / f"{step}.gin").read_text() == "TrainConfig.steps = 7\n"
    (tmp_path / "checkpoints" / "9.gin").write_text("left by a checkpoint that never committed")
    ck.wait()
    assert finished_steps(str(tmp_path)) == [2, 3]  # keep = 2
    assert sorted(p for p in os.listdir(tmp_path / "checkpoints") if ".gin" in p) == ["2.gin", "3.gin"]
    state, data, config = ck.restore(3, None)
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 3.0))
    assert data == {"pos": 3} and config == meta
    ck.close()
    os.makedirs(tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123")  # an uncommitted save
    assert finished_steps(str(tmp_path)) == [2, 3] and finished_steps(str(tmp_path / "none")) == []
    assert not os.path.exists(tmp_path / "none")


def test_trim_metrics_drops_replayed_and_cut_lines(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # a kill cut the last line
    assert trim_metrics(str(tmp_path), 3) == 3
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert trim_metrics(str(tmp_path), 3) == 0
    assert trim_metrics(str(tmp_path / "missing"), 3) == 0
