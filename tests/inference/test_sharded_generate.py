"""Sharded generation (tensor and expert axes) gives the tokens of one device: 8 fake CPU devices in a
subprocess, so this pytest process keeps its single device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
# rows over data x expert, heads over tensor (query and KV heads split alike), experts over expert through the
# capacity-based dispatch; sharded_generate.py also takes e.g. "fsdp=2,tensor=4" (KV heads kept whole)
MESHES = ["data=2,tensor=2,expert=2:ep_capacity"]


@pytest.mark.slow
def test_generation_on_a_mesh_matches_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(HERE / "sharded_generate.py"), *MESHES], env=env, capture_output=True,
                       text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    out = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [o["mesh"] for o in out] == MESHES
    for o in out:
        assert o["devices"] == 8 and o["tokens_equal"] and o["logprob_abs"] < 1e-5, o
        assert "tensor" in o["q_proj_spec"], o  # the weights really are sharded
