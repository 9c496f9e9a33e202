"""The RL loop end to end on a tiny model (a few steps: it learns nothing, every piece runs): the supervised
warm-up, rollouts, a user reward, dynamic sampling, off-policy minibatch updates, evaluation, metrics,
checkpoints; resume in the middle of RL is exact (bitwise parameters and the next rollout); the same run on
an 8-device CPU mesh (fsdp x tensor x expert, in a subprocess) matches one device; failing reward
functions; the update's non-finite rule."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax.train import main
from m1_jax.train.checkpoint import Checkpointer
from m1_jax.train.config import load_config

MODEL = ("TrainConfig.model_overrides = {'num_hidden_layers': 2, 'layer_types': ('linear_attention', "
         "'full_attention'), 'block_size': 8, 'moe_impl': 'dense'}")
RL = [
    "TrainConfig.mode = 'rl'", MODEL, "TrainConfig.log_every = 1", "TrainConfig.tensorboard = False",
    "TrainConfig.checkpoint_every = 2", "RLConfig.task = 'copying'", "RLConfig.task_size = 2",
    "RLConfig.prompts_per_step = 4", "RLConfig.group_size = 4", "RLConfig.minibatches = 2", "RLConfig.epochs = 2",
    "RLConfig.max_prompt_len = 8", "RLConfig.max_response_len = 4", "RLConfig.eval_every = 2",
    "RLConfig.eval_prompts = 8", "RLConfig.eval_samples = 2", "RLConfig.warmup_steps = 3",
    "RLConfig.warmup_batch_size = 8", "RLConfig.reward = 'rl_test_rewards:digits'", "RLConfig.logprob_chunk_size = 24",
    "OptimizerConfig.learning_rate = 1e-3", "OptimizerConfig.warmup_steps = 0", "OptimizerConfig.eps = 1e-15",
    "OptimizerConfig.schedule = 'constant'",
]
REWARDS = """
def digits(prompt, response):  # varies across samples of a random model: groups carry signal
    return sum(c.isdigit() for c in response) / 4

def fails(prompt, response):
    raise ZeroDivisionError("reward bug")
"""


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "rl_test_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("rl_test_rewards", None)


def _cfg(run_dir, *extra):
    return load_config([], RL + [f"TrainConfig.run_dir = '{run_dir}'", *extra])


def _metrics(run_dir):
    return [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def _params(run_dir, step):
    ck = Checkpointer(str(run_dir), keep=10)
    try:
        state, source, _ = ck.restore(step, None)
    finally:
        ck.close()
    return jax.tree.map(np.asarray, state), source


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, reward_module):
    from m1_jax.rl.loop import train_rl

    tmp = tmp_path_factory.mktemp("rl")
    res = train_rl(_cfg(tmp / "full", "TrainConfig.steps = 3", "TrainConfig.fault_steps = (1,)"), verbose=False)
    return tmp, res


def test_short_rl_run_every_piece(full_run):
    tmp, res = full_run
    assert res.status == "completed" and res.step == 3 and res.nonfinite_total == 1
    assert os.path.isdir(tmp / "full" / "warmup" / "checkpoints" / "3")  # the supervised warm-up ran
    lines = _metrics(tmp / "full")
    assert [l["step"] for l in lines] == [0, 1, 2, 3]
    assert {"eval/reward_mean", "eval/greedy_reward_mean"} <= set(lines[0]) and "eval/reward_mean" in lines[2]
    step1 = lines[1]
    for k in ("reward/mean", "reward/pass_rate", "response/length_mean", "is/clip_fraction", "is/ratio_mean",
              "is/ratio_max", "is/ratio_min", "entropy", "mismatch/logp_abs_mean", "mismatch/prob_corr",
              "grad_norm", "policy_loss", "perf/rollout_tokens_per_s", "perf/update_tokens_per_s", "rollout/kept_groups"):
        assert k in step1 and np.isfinite(step1[k]), k
    assert step1["skipped"] == 1 and step1["updates_run"] == 4  # epochs 2 x minibatches 2, update 1 faulted
    assert 0 < step1["reward/mean"] < 1 and step1["rollout/kept_groups"] >= 1
    # The trainer's float32 log-probabilities agree with the sampler's on the first (on-policy) update.
    assert all(l["mismatch/logp_abs_mean"] < 1e-4 for l in lines[1:])
    assert all(l["is/ratio_min"] <= 1.0 + 1e-6 <= l["is/ratio_max"] + 2e-6 for l in lines[1:])
    assert sorted(res.history["eval/reward_mean"]) == [0, 2, 3]


def test_resume_in_the_middle_of_rl_is_exact(full_run):
    from m1_jax.rl.loop import train_rl

    tmp, full = full_run
    init = f"RLConfig.init_checkpoint = '{tmp}/full/warmup'"  # the same starting point as the full run
    part = train_rl(_cfg(tmp / "part", "TrainConfig.steps = 3", "TrainConfig.stop_after = 2",
                         "TrainConfig.fault_steps = (1,)", init), verbose=False)
    assert part.status == "stopped" and part.checkpoint_step == 2
    rest = train_rl(_cfg(tmp / "part", "TrainConfig.steps = 3", "TrainConfig.fault_steps = (1,)", init), verbose=False)
    assert rest.status == "completed" and sorted(rest.losses) == [2]
    a, src_a = _params(tmp / "full", 3)
    b, src_b = _params(tmp / "part", 3)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert src_a == src_b  # prompt order and rollout random state
    full_m, part_m = _metrics(tmp / "full"), _metrics(tmp / "part")
    assert [l["step"] for l in part_m] == [0, 1, 2, 3]
    drop = lambda l: {k: v for k, v in l.items() if not k.startswith("perf/")}
    assert drop(part_m[3]) == drop(full_m[3])  # the rollout after the resume and its updates, exactly


MESH_SCRIPT = """
import json, sys
import jax
from m1_jax.rl.loop import train_rl
from m1_jax.train.config import load_config
assert jax.device_count() == 8, jax.devices()
bindings, run_dir = json.loads(sys.argv[1]), sys.argv[2]
res = train_rl(load_config([], bindings + [f"TrainConfig.run_dir = '{run_dir}'", "MeshConfig.fsdp = 2",
                                           "MeshConfig.tensor = 2", "MeshConfig.expert = 2"]), verbose=False)
print("DONE", res.status)
"""


def test_rl_on_a_mesh_matches_one_device(full_run, reward_module):
    """Rollouts, updates and evaluation with the parameters on fsdp 2 x tensor 2 x expert 2: the same samples,
    rewards and evaluations as the one-device run, close losses and parameters."""
    from m1_jax.convert.training_checkpoint import load_training_checkpoint

    tmp, _ = full_run
    bindings = RL + ["TrainConfig.steps = 3", "TrainConfig.fault_steps = (1,)",
                     f"RLConfig.init_checkpoint = '{tmp}/full/warmup'"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([str(reward_module), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(bindings), str(tmp / "mesh")],
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0 and "DONE completed" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
    a, b = _metrics(tmp / "full"), _metrics(tmp / "mesh")
    assert [l["step"] for l in a] == [l["step"] for l in b] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        for k in ("reward/mean", "response/length_mean", "eval/reward_mean", "eval/greedy_reward_mean",
                  "rollout/kept_groups", "skipped"):
            if k in x:
                assert x[k] == y[k], (x["step"], k, x[k], y[k])  # the same samples
        for k in ("policy_loss", "grad_norm", "entropy", "is/ratio_max", "mismatch/logp_abs_mean"):
            if k in x:
                np.testing.assert_allclose(y[k], x[k], rtol=1e-3, atol=1e-5, err_msg=k)
    pa, pb = (jax.tree.leaves(nnx.state(load_training_checkpoint(str(tmp / r))[1], nnx.Param)) for r in ("full", "mesh"))
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=2e-5)


def test_failing_reward_function(full_run, capsys):
    from m1_jax.rl.loop import train_rl

    tmp, _ = full_run
    common = ["TrainConfig.steps = 1", f"RLConfig.init_checkpoint = '{tmp}/full/warmup'",
              "RLConfig.reward = 'rl_test_rewards:fails'"]
    args = [f"--gin_bindings={b}" for b in RL + common] + [f"--gin.TrainConfig.run_dir={tmp}/fails"]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "raised ZeroDivisionError: reward bug on prompt 'copy" in err and "response '" in err
    res = train_rl(_cfg(tmp / "scored", *common, "RLConfig.reward_errors = 'score'", "RLConfig.reward_error_value = -1.0"),
                   verbose=True)
    out = capsys.readouterr().out
    assert res.status == "completed" and "scored -1.0" in out and "prompt 'copy" in out
    line = _metrics(tmp / "scored")[1]
    assert line["reward/errors"] == 16 * line["rollout/batches"] and line["reward/mean"] == -1.0


def test_update_keeps_the_state_on_a_nonfinite_step_and_computes_the_policy_loss():
    from m1_jax import ModelConfig
    from m1_jax.model import abstract_model
    from m1_jax.rl.update import initial_state, make_update_step
    from m1_jax.train.optimizer import OptimizerConfig, make_optimizer

    cfg = ModelConfig.preset("tiny", num_hidden_layers=2, layer_types=("linear_attention", "full_attention"),
                             block_size=8, moe_impl="dense")
    graphdef, abs_params = abstract_model(cfg, 0)
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"), 10)
    from m1_jax import MiniMaxForCausalLM

    params = jax.jit(lambda: nnx.state(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (4, 9)).astype(np.int32)
    mask = np.zeros((4, 8), np.float32)
    mask[:, 3:7] = 1
    mb = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]), "mask": jnp.asarray(mask),
          "old_logp": jnp.asarray(-rng.uniform(4, 7, (4, 8)).astype(np.float32) * mask),
          "advantages": jnp.asarray(rng.normal(size=4).astype(np.float32))}
    update = jax.jit(make_update_step(graphdef, tx, sched, loss="cispo", eps_low=None, eps_high=0.28, aux_loss_coef=0.0,
                                      chunk_size=8, fault_updates=(1,)))
    s0 = jax.jit(lambda p: initial_state(p, tx, 0))(params)
    before = jax.tree.map(np.asarray, s0)
    s1, m1 = update(s0, mb)
    after1 = jax.tree.map(np.asarray, s1)
    s2, m2 = update(s1, mb)  # update 1 is faulted: loss and gradients NaN
    after2 = jax.tree.map(np.asarray, s2)
    assert int(m1["skipped"]) == 0 and int(m2["skipped"]) == 1 and int(after2["nonfinite_total"]) == 1
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after1["params"])))
    for key in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(after1[key]), jax.tree.leaves(after2[key]), strict=True):
            np.testing.assert_array_equal(x, y)
    assert int(after2["updates"]) == 2 and int(after2["step"]) == 0  # the loop advances the RL step
    # The reported policy loss is CISPO's formula on log-probabilities from the full float32 logits.
    logits = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, mb["inputs"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0] - lse
    w = np.minimum(np.exp(logp - np.asarray(mb["old_logp"])), 1.28)
    expected = -np.sum(w * np.asarray(mb["advantages"])[:, None] * logp * mask) / mask.sum()
    np.testing.assert_allclose(float(m1["policy_loss"]), expected, rtol=1e-4)
