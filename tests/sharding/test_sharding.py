"""Sharding layer tests.

The rules and mesh-config checks run in this process. Everything that needs several devices runs in
a subprocess with fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so the
main pytest process keeps its single device: ``python -m pytest tests/sharding`` needs no special setup.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from sharding import AXES, MeshConfig, logical_to_mesh_spec, use_rules

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def _run(script: str, args: list[str], devices: int, timeout: int = 1800, env_extra=None) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _abstract(**sizes):
    return AbstractMesh(tuple(sizes.get(a, 1) for a in AXES), AXES)


# ------------------------------------------------------------------------------------ in-process
def test_mesh_config_resolve():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(16) == dict(data=2, fsdp=4, expert=1, context=1, tensor=2)
    assert MeshConfig(fsdp=1, expert=-1).resolve(8)["expert"] == 8
    assert MeshConfig.from_string("data=2,fsdp=-1,context=2").resolve(8)["fsdp"] == 2
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="not divisible"):
        MeshConfig(tensor=3).resolve(8)
    with pytest.raises(ValueError, match="multiply to 4"):
        MeshConfig(data=2, fsdp=2).resolve(8)
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        MeshConfig.from_string("model=2")
    with pytest.raises(ValueError, match="dcn_data = 3 does not divide"):
        MeshConfig(data=4, fsdp=-1, dcn_data=3).resolve(8)


def test_rules_table():
    mesh = _abstract(data=2, fsdp=4, expert=2, context=2, tensor=4)
    # expert weights: exp -> expert, embed -> fsdp, context (expert already used), mlp -> tensor
    assert logical_to_mesh_spec(("layers", "exp", "embed", "mlp"), (10, 32, 6144, 9216), mesh) == \
        P(None, "expert", ("fsdp", "context"), "tensor")
    # dense weights: embed also over the expert axis
    assert logical_to_mesh_spec(("embed", "heads", "head_dim"), (6144, 64, 128), mesh) == \
        P(("fsdp", "context", "expert"), "tensor")
    # kv_heads = 2 cannot split 4 ways: replicated
    assert logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (6144, 2, 128), mesh) == \
        P(("fsdp", "context", "expert"))
    # activations: batch over data/fsdp/expert, dropping axes that do not divide; length over context
    assert logical_to_mesh_spec(("activation_batch", "activation_length", "activation_embed"),
                                (8, 4096, 6144), mesh) == P(("data", "fsdp"), "context")
    assert logical_to_mesh_spec(("activation_batch", "activation_length"), (16, 4096), mesh) == \
        P(("data", "fsdp", "expert"), "context")
    # size-1 axes disappear; no mesh -> the full rule
    assert logical_to_mesh_spec(("embed", "mlp"), (64, 96), _abstract(fsdp=8)) == P("fsdp")
    assert logical_to_mesh_spec(("vocab", "embed")) == P("tensor", ("fsdp", "context", "expert"))
    with use_rules([("embed", ("fsdp",)), ("vocab", ())]):
        assert logical_to_mesh_spec(("vocab", "embed"), (256, 64), mesh) == P(None, "fsdp")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        with use_rules([("embed", ("model",))]):
            pass


def _subtrees_like(tree, structure, found=None):
    """Every subtree of ``tree`` (tuples, named tuples, dicts) whose structure is ``structure``."""
    found = [] if found is None else found
    if jax.tree.structure(tree) == structure:
        found.append(tree)
    elif isinstance(tree, dict):
        for v in tree.values():
            _subtrees_like(v, structure, found)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            _subtrees_like(v, structure, found)
    return found


def test_state_shardings_cover_model_and_optimizer():
    """The train state (params + AdamW with clipping) on an abstract 16-device mesh, no devices needed:
    Adam's two moments get exactly their parameters' specs, and the specs follow the rules table."""
    from flax import nnx

    from m1_jax import ModelConfig
    from m1_jax.train import step as step_lib
    from m1_jax.train.optimizer import OptimizerConfig, make_optimizer
    from sharding import state_shardings
    from sharding.rules import variable_logical_axes

    mesh = _abstract(fsdp=4, tensor=2, expert=2)
    tx, _ = make_optimizer(OptimizerConfig(), 100)
    state = step_lib.abstract_state(ModelConfig.preset("tiny"), tx)
    sh = state_shardings(state, mesh)
    assert jax.tree.structure(sh) == jax.tree.structure(state)
    assert all(isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(sh))
    specs = lambda t: [s.spec for s in jax.tree.leaves(t)]  # noqa: E731
    params = specs(sh["params"])
    moments = _subtrees_like(sh["opt_state"], jax.tree.structure(sh["params"]))
    assert len(moments) == 2  # mu and nu
    for m in moments:
        assert specs(m) == params
    # a few parameters, read off the rules: exp -> expert, embed -> fsdp (+ expert outside the experts),
    # mlp / heads / vocab -> tensor; the layer axis and 1-d norms stay whole
    p = sh["params"]
    moe = p["blocks"]["layers"][0]["block_sparse_moe"]
    assert moe["w1"].value.spec == P(None, "expert", "fsdp", "tensor")
    assert moe["gate"].value.spec == P(None, ("fsdp", "expert"))
    assert p["embed_tokens"].value.spec == P("tensor", ("fsdp", "expert"))
    assert p["lm_head"].value.spec == P(("fsdp", "expert"), "tensor")
    assert p["norm"]["weight"].value.spec == P()
    variables = jax.tree.leaves(state["params"], is_leaf=lambda x: isinstance(x, nnx.Variable))
    matrices = [s for s, v in zip(params, variables) if "embed" in (variable_logical_axes(v) or ())]
    assert len(matrices) >= 10 and all(s != P() for s in matrices)  # no weight matrix is replicated


# ------------------------------------------------------------------------------------ subprocesses
MESHES_8 = [
    "fsdp=8",
    "data=2,fsdp=2,tensor=2",
    "expert=4,data=2,fsdp=1:ep_capacity",
    "context=4,fsdp=2",
    "fsdp=2,tensor=2,expert=2:ep_capacity",
]


@pytest.mark.slow
def test_model_matches_single_device_on_8_devices():
    out = _run("mesh_parity.py", MESHES_8, devices=8)
    assert len(out) == len(MESHES_8)
    for r in out:
        assert r["logits_rel"] < 1e-5 and r["loss_abs"] < 1e-5 and r["grad_rel"] < 1e-4, r
        if "expert=4" in r["mesh"] or "expert=2" in r["mesh"]:
            assert "all_to_all" in r["collectives"], r
            assert "expert" in r["w1_spec"], r
        if "context=4" in r["mesh"]:
            assert "all_gather" in r["collectives"] and "context" in r["logits_spec"], r
    by_mesh = {r["mesh"]: r for r in out}
    assert by_mesh["fsdp=8"]["w1_spec"] == "P(None, None, 'fsdp')"
    assert by_mesh["data=2,fsdp=2,tensor=2"]["w1_spec"] == "P(None, None, 'fsdp', 'tensor')"


@pytest.mark.slow
def test_model_matches_single_device_on_all_five_axes():
    # every axis of size 2 needs 32 devices
    (r,) = _run("mesh_parity.py", ["data=2,fsdp=2,tensor=2,expert=2,context=2:ep_capacity"], devices=32)
    assert all(s == 2 for s in r["sizes"].values()), r
    assert r["logits_rel"] < 1e-5 and r["loss_abs"] < 1e-5 and r["grad_rel"] < 1e-4, r
    assert {"all_to_all", "all_gather"} <= set(r["collectives"]), r
    assert r["w1_spec"] == "P(None, 'expert', ('fsdp', 'context'), 'tensor')", r


@pytest.mark.slow
def test_expert_and_context_parallel_pieces():
    out = _run("parallel_checks.py", [], devices=8)
    kinds = {r["check"] for r in out}
    assert kinds == {"moe_capacity", "moe_ragged_emulated", "lasp2", "softmax_cp"}
    for r in out:
        if r["check"] == "moe_ragged_emulated":
            assert r["y_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r
        elif r["check"] == "moe_capacity":
            assert r["y_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r
            assert abs(r["dropped"] - r["dropped_oracle"]) < 1e-6, r
            assert (r["dropped"] > 0) == (r["capacity_factor"] > 0), r
        elif r["check"] == "lasp2":
            assert r["o_rel"] < 1e-5 and r["state_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r
        else:
            assert r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_training_matches_single_process(tmp_path):
    script = str(HERE / "multiprocess_train.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ref = subprocess.Popen([sys.executable, script, "--out", str(tmp_path / "ref.npz")], env=env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = _free_port()
    penv = dict(env, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, script, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--mesh", "data=2,fsdp=2"]
                              + (["--out", str(tmp_path / "multi.npz")] if i == 0 else []),
                              env=penv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        for p in [ref, *procs]:
            _, err = p.communicate(timeout=1800)
            assert p.returncode == 0, err[-4000:]
    finally:
        for p in [ref, *procs]:
            if p.poll() is None:
                p.kill()
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "multi.npz")
    assert a["losses"][-1] < a["losses"][0]  # it trains
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    keys = [k for k in a.files if k != "losses"]
    assert keys and set(keys) == set(b.files) - {"losses"}
    for k in keys:
        assert np.max(np.abs(a[k] - b[k])) <= 1e-5 * max(np.max(np.abs(a[k])), 1e-6), k


def test_m1_80k_parameters_are_fully_sharded():
    """Every axis but ``data`` shards parameters: on 256 devices each holds ~1/256 of the 456B (the
    MaxText-style "sufficiently sharded" check, from shapes only)."""
    from m1_jax import ModelConfig
    from m1_jax.memory import param_shards

    cfg = ModelConfig.preset("m1-80k")
    for mesh in ("fsdp=8,expert=8,tensor=4", "fsdp=4,expert=8,context=2,tensor=4", "data=2,fsdp=4,expert=8,tensor=4"):
        sizes = MeshConfig.from_string(mesh).resolve(256)
        per_dev, total = param_shards(cfg, sizes)
        assert 456e9 < total < 457e9
        sharding_ways = 256 // sizes["data"]
        assert per_dev <= 1.02 * total / sharding_ways, (mesh, per_dev, total / sharding_ways)
