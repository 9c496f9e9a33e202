"""The train loop on a 4-device CPU mesh (data x fsdp), resumed onto a different mesh (fsdp 4): the
sharded step and the resharding restore give the single-device losses."""

import json
import os
import subprocess
import sys

import numpy as np

from m1_jax.train.config import load_config
from m1_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINDINGS = [
    "TrainConfig.model_overrides = {'num_hidden_layers': 2, 'layer_types': ('linear_attention', 'full_attention'), "
    "'block_size': 16}",
    "DataConfig.seq_len = 32", "DataConfig.batch_size = 8", "OptimizerConfig.warmup_steps = 2",
    "TrainConfig.log_every = 1", "TrainConfig.sample_tokens = 0", "TrainConfig.progress_bar = False",
    "TrainConfig.tensorboard = False", "TrainConfig.steps = 6",
]

SCRIPT = """
import json, sys
from m1_jax.train.config import load_config
from m1_jax.train.loop import train
import jax
assert jax.device_count() == 4, jax.devices()
b, run_dir = json.loads(sys.argv[1]), sys.argv[2]
first = train(load_config([], b + [f"TrainConfig.run_dir = '{run_dir}'", "TrainConfig.stop_after = 3",
                                   "MeshConfig.data = 2", "MeshConfig.fsdp = 2"]), verbose=False)
rest = train(load_config([], b + [f"TrainConfig.run_dir = '{run_dir}'", "MeshConfig.fsdp = 4"]), verbose=False)
print("LOSSES", json.dumps({**first.losses, **rest.losses}))
"""


def test_sharded_run_and_reshard_on_resume(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(BINDINGS), str(tmp_path / "mesh")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES ")][-1]
    sharded = {int(k): v for k, v in json.loads(line[len("LOSSES "):]).items()}
    single = train(load_config([], BINDINGS + [f"TrainConfig.run_dir = '{tmp_path}/one'"]), verbose=False)
    assert sorted(sharded) == list(range(6))
    np.testing.assert_allclose([sharded[s] for s in range(6)], [single.losses[s] for s in range(6)], rtol=2e-5)
