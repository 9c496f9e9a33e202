"""The RL loop (``TrainConfig.mode = 'rl'``): rollouts -> rewards -> group advantages with dynamic
sampling -> minibatch updates -> held-out evaluation, on the setup, step loop and finish of pretraining
(:mod:`m1_jax.train.setup`, :mod:`m1_jax.train.driver`).

One RL step: ``prompts_per_step`` training prompts, ``group_size`` samples each (temperature
``RLConfig.temperature``); rewards; groups whose rewards are all equal carry no signal and are dropped
(dynamic sampling: more prompts are drawn, up to ``max_rollout_batches`` rollout batches, to fill the
step); advantages relative to the group; then ``epochs`` passes of ``minibatches`` updates over the
step's rows (groups shuffled), the first on-policy, the later ones off-policy (where CISPO and PPO-style
clipping differ). Checkpoints hold the state and the host random state (prompt order, sampling seeds,
shuffles), so a resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from m1_jax.config import ConfigError
from m1_jax.data.tokenizer import make_tokenizer
from m1_jax.model import abstract_model
from m1_jax.rl.advantages import group_advantages
from m1_jax.rl.config import RLConfig
from m1_jax.rl.rewards import RewardError, Scorer
from m1_jax.rl.rollout import WarmupBatches, encode_prompts, rollout, stop_token_ids, update_rows
from m1_jax.rl.tasks import Task
from m1_jax.rl.update import initial_state, jit_bump, jit_update, make_update_step
from m1_jax.train.config import RunConfig, as_dict
from m1_jax.train.driver import RunResult, already_complete_message, finish, run_steps
from m1_jax.train.metrics import MetricsLogger
from m1_jax.train.optimizer import OptimizerConfig, make_optimizer
from m1_jax.train.setup import check_batch_layout, console, find_resume, jit_init, mesh_summary, open_run
from m1_jax.train.signals import Signals

__all__ = ["train_rl"]

# Per-update metrics reduced over a step's updates by max / min; the rest by mean (mismatch: first update).
_MAX = ("is/ratio_max",)
_MIN = ("is/ratio_min",)
_FIRST = ("mismatch/logp_abs_mean", "mismatch/logp_abs_max", "mismatch/prob_corr")


def _resolve_init(rc: RLConfig):
    """``(step folder, ModelConfig)`` of ``RLConfig.init_checkpoint`` (read-only), or ``(None, None)``."""
    if rc.init_checkpoint is None:
        return None, None
    from m1_jax.convert.errors import CheckpointError
    from m1_jax.convert.training_checkpoint import model_config_from_run, read_run_config, resolve_step_folder

    try:
        step_dir = resolve_step_folder(rc.init_checkpoint)
        return step_dir, model_config_from_run(read_run_config(step_dir), step_dir)
    except CheckpointError as e:
        raise ConfigError(f"RLConfig.init_checkpoint = {rc.init_checkpoint!r}: {e}") from None


def _warmup(run: RunConfig, task: Task, tokenizer, stop: int, *, verbose: bool) -> str:
    """The supervised warm-up (a pretraining run on the task's answers) in ``run_dir/warmup``; its folder."""
    from m1_jax.train.loop import train

    rc, tc = run.rl, run.train
    folder = os.path.join(tc.run_dir, "warmup")
    steps = rc.warmup_steps
    _, prompts = task.split(rc.eval_prompts, tc.seed, stream=1, eval_seed=rc.eval_seed)  # held-out excluded here too
    wrun = dataclasses.replace(
        run,
        train=dataclasses.replace(tc, mode="pretrain", steps=steps, stop_after=None, run_dir=folder, resume="auto",
                                  checkpoint_every=steps, log_every=max(1, steps // 5), sample_tokens=0,
                                  fault_steps=(), progress_bar=False),
        data=dataclasses.replace(run.data, batch_size=rc.warmup_batch_size, seq_len=rc.seq_len,
                                 source=f"RL warm-up on {rc.task!r}"),
        optimizer=OptimizerConfig(learning_rate=rc.warmup_learning_rate, warmup_steps=max(1, steps // 10),
                                  schedule="cosine", clip_norm=1.0, weight_decay=0.0),
        rl=None,
        operative_gin=f"# supervised warm-up ({steps} steps) of the RL run configured below\n" + run.operative_gin)
    say = console(verbose)
    say(f"  no RLConfig.init_checkpoint: supervised warm-up on the task ({steps} steps, batch {rc.warmup_batch_size}) "
        f"in {folder}")
    source = WarmupBatches(prompts, tokenizer, batch_size=rc.warmup_batch_size, seq_len=rc.seq_len, stop_token=stop)
    train(wrun, verbose=verbose, source=source)
    return folder


def _reduce(per_update: list[dict]) -> dict:
    """One step's metrics from its updates: means over the updates that were applied (a skipped, non-finite
    update would make every mean NaN; it is counted in ``skipped``)."""
    out = {}
    ok = 1.0 - jnp.stack([jnp.asarray(m["skipped"], jnp.float32) for m in per_update])
    for k in per_update[0]:
        vals = jnp.stack([jnp.asarray(m[k], jnp.float32) for m in per_update])
        if k in _FIRST:  # the first update of a step runs on the sampler's own parameters
            out[k] = vals[0]
        elif k in _MAX:
            out[k] = jnp.max(jnp.where(ok > 0, vals, -jnp.inf))
        elif k in _MIN:
            out[k] = jnp.min(jnp.where(ok > 0, vals, jnp.inf))
        elif k == "skipped":
            out[k] = jnp.sum(vals)
        elif k in ("nonfinite_total", "nonfinite_streak"):
            out[k] = vals[-1]
        else:
            out[k] = jnp.sum(jnp.where(ok > 0, vals, 0.0)) / jnp.sum(ok)  # NaN only if every update was skipped
    return out


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train_rl(run: RunConfig, *, verbose: bool = True) -> RunResult:
    rc, tc = run.rl, run.train
    if rc is None:
        raise ConfigError("TrainConfig.mode = 'rl' needs an RLConfig (load the run with m1_jax.train.config.load_config)")
    say = console(verbose)

    # ---------------------------------------------------------------- checks (nothing is written yet)
    mesh = sharding.make_mesh(run.mesh)
    check_batch_layout(mesh, rc.minibatch_rows, rc.seq_len - 1,
                       batch_field="RLConfig.prompts_per_step x group_size / minibatches",
                       seq_field="RLConfig.max_prompt_len + max_response_len - 1")
    init_dir, init_model = _resolve_init(rc)
    if init_model is not None:
        run = dataclasses.replace(run, model=init_model)
    else:
        check_batch_layout(mesh, rc.warmup_batch_size, rc.seq_len, batch_field="RLConfig.warmup_batch_size",
                           seq_field="RLConfig.max_prompt_len + max_response_len")
    model_cfg = run.model
    tokenizer = make_tokenizer(run.data.tokenizer, run.data.eos_token)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer {run.data.tokenizer!r} has {tokenizer.vocab_size} tokens but "
                          f"ModelConfig.vocab_size = {model_cfg.vocab_size}")
    task = Task(rc.task, rc.task_size, prompt_key=rc.prompt_key, answer_key=rc.answer_key)
    held_out, prompts = task.split(rc.eval_prompts, tc.seed, eval_seed=rc.eval_seed)
    stops = stop_token_ids(tokenizer, rc.stop_text)
    for ex in held_out[:64]:
        try:
            encode_prompts(tokenizer, [ex.prompt], rc.max_prompt_len)
        except ValueError as e:
            raise ConfigError(f"RLConfig.max_prompt_len = {rc.max_prompt_len} is invalid: {e}") from None
        if task.synthetic and len(tokenizer.encode(ex.answer)) + 1 > rc.max_response_len:
            raise ConfigError(f"RLConfig.max_response_len = {rc.max_response_len} is invalid: the answer of "
                              f"{ex.prompt!r} ({ex.answer!r}) and the stop token need "
                              f"{len(tokenizer.encode(ex.answer)) + 1} tokens")
    scorer = Scorer(rc.reward, default=task.default_reward, on_error=rc.reward_errors,
                    error_value=rc.reward_error_value, report=say)
    total_updates = rc.updates(tc.steps)
    tx, schedule = make_optimizer(run.optimizer, total_updates)
    graphdef, abs_params = abstract_model(model_cfg, tc.seed)
    abs_state = jax.eval_shape(lambda p: initial_state(p, tx, tc.seed), abs_params)
    shardings = sharding.state_shardings(abs_state, mesh)
    resume = find_resume(tc, model_cfg)

    # ---------------------------------------------------------------- run folder, state, logger
    def init():
        from m1_jax.convert.training_checkpoint import load_training_checkpoint

        path = init_dir or _warmup(run, task, tokenizer, stops[0], verbose=verbose)
        _, model, info = load_training_checkpoint(path, mesh=mesh)
        say(f"  policy initialised from {info['directory']}")
        return jit_init(lambda p: initial_state(p, tx, tc.seed), shardings, mesh, nnx.state(model, nnx.Param))

    now = json.loads(json.dumps(as_dict(run), default=str))
    session = open_run(run, mesh=mesh, resume=resume, abstract_state=abs_state, shardings=shardings, init_state=init,
                       run_meta={"operative_gin": run.operative_gin, "config": now}, say=say, as_dict_now=now)
    n = model_cfg.num_params()
    say(f"m1-jax RL ({rc.loss}): {n['total'] / 1e6:.2f}M params, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, mesh {mesh_summary(mesh)}; task {rc.task!r} (size {rc.task_size}), "
        f"reward {scorer.name!r}; {rc.prompts_per_step} prompts x {rc.group_size} samples per step, "
        f"{rc.epochs} x {rc.minibatches} updates per step; run folder {tc.run_dir}")
    rollout_rng = np.random.default_rng([tc.seed, 3])
    if session.source_state is not None:
        prompts.set_state(session.source_state["prompts"])
        rollout_rng.bit_generator.state = session.source_state["rollout_rng"]

    def source_state():
        return {"prompts": prompts.get_state(), "rollout_rng": rollout_rng.bit_generator.state}

    history: dict[str, dict[int, float]] = {"eval/reward_mean": {}, "eval/greedy_reward_mean": {}, "reward/mean": {}}
    certain = (rc.certain_stop_tokens, rc.certain_stop_prob) if rc.certain_stop_tokens > 0 else None

    def evaluate(params) -> dict[str, float]:
        """Held-out prompts: ``eval_samples`` samples each at the rollout temperature (the quantity RL raises;
        fixed seed) and the greedy answer."""
        model = nnx.merge(graphdef, params)
        out = {}
        for prefix, temperature, k in (("eval/", rc.temperature, rc.eval_samples), ("eval/greedy_", 0.0, 1)):
            if k == 0:
                continue
            r = rollout(model, tokenizer, held_out, group_size=k, max_prompt_len=rc.max_prompt_len,
                        max_response_len=rc.max_response_len, temperature=temperature, seed=tc.seed + 1,
                        stop_tokens=stops, certain_stop=certain)
            rewards, _ = scorer([ex.prompt for ex in r.examples], r.responses, [ex.answer for ex in r.examples])
            rewards = np.asarray(rewards, np.float64)
            out.update({f"{prefix}reward_mean": float(rewards.mean()), f"{prefix}pass_rate": float((rewards >= 1.0).mean()),
                        f"{prefix}response_length": float(r.lengths.mean())})
        if "eval/reward_mean" not in out:  # eval_samples = 0: the greedy answers are the evaluation
            out["eval/reward_mean"], out["eval/pass_rate"] = out["eval/greedy_reward_mean"], out["eval/greedy_pass_rate"]
        return out

    if session.start >= session.end:
        say(already_complete_message(session, tc.steps))
        session.ckpt.close()
        return RunResult("already_complete", session.start, {}, int(jax.device_get(session.state["nonfinite_total"])),
                         None, session.resumed_from, history)

    update = jit_update(make_update_step(graphdef, tx, schedule, loss=rc.loss, eps_low=rc.eps_low,
                                         eps_high=rc.eps_high, aux_loss_coef=model_cfg.router_aux_loss_coef,
                                         chunk_size=rc.logprob_chunk_size, fault_updates=tc.fault_steps),
                        shardings, mesh)
    bump = jit_bump(shardings)
    rows_sh, adv_sh = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    session.log = MetricsLogger(tc.run_dir, total_steps=session.end, start_step=session.start, flops_per_step=0.0,
                                tokens_per_step=0, peak_tflops=None, progress_bar=False, tensorboard=tc.tensorboard,
                                is_main=session.is_main, console=False)
    losses: dict[int, float] = {}
    clock = {"first_done": None, "steps_timed": 0}

    def collect(model) -> tuple[list, dict]:
        """Rollout batches until ``prompts_per_step`` informative groups (or ``max_rollout_batches``)."""
        kept, sampled, gen_tokens, errors, t0 = [], [], 0, 0, time.perf_counter()
        for _ in range(rc.max_rollout_batches):
            r = rollout(model, tokenizer, prompts.take(rc.prompts_per_step), group_size=rc.group_size,
                        max_prompt_len=rc.max_prompt_len, max_response_len=rc.max_response_len,
                        temperature=rc.temperature, seed=int(rollout_rng.integers(2 ** 31)), stop_tokens=stops,
                        certain_stop=certain)
            rewards, failed = scorer([ex.prompt for ex in r.examples], r.responses, [ex.answer for ex in r.examples])
            r.rewards = np.asarray(rewards, np.float32)
            errors += failed
            sampled.append(r)
            gen_tokens += int(r.lengths.sum())
            groups = r.rewards.reshape(-1, rc.group_size)
            informative = np.any(groups != groups[:, :1], axis=1) if rc.dynamic_sampling else np.ones(len(groups), bool)
            kept.extend((r, g) for g in np.flatnonzero(informative))
            if len(kept) >= rc.prompts_per_step or not rc.dynamic_sampling:
                break
        dt = time.perf_counter() - t0
        rewards = np.concatenate([r.rewards for r in sampled]).astype(np.float64)
        lengths = np.concatenate([r.lengths for r in sampled])
        stopped = np.concatenate([r.stopped for r in sampled])
        stats = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                 "reward/pass_rate": float((rewards >= 1.0).mean()), "reward/errors": float(errors),
                 "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
                 "response/stopped_fraction": float(stopped.mean()),
                 "rollout/batches": float(len(sampled)), "rollout/kept_groups": float(min(len(kept), rc.prompts_per_step)),
                 "rollout/informative_fraction": float(len(kept) / (len(sampled) * rc.prompts_per_step)),
                 "perf/rollout_s": dt, "perf/rollout_tokens_per_s": gen_tokens / dt if dt > 0 else 0.0}
        return kept[:rc.prompts_per_step], stats

    def batch_rows(kept) -> tuple[dict, int]:
        """The step's update rows (real groups first, then masked padding) and how many rows are real."""
        G = rc.group_size
        parts, advs = [], []
        for r, g in kept:
            sl = slice(g * G, (g + 1) * G)
            sub = dataclasses.replace(r, examples=r.examples[sl], prompt_ids=r.prompt_ids[sl],
                                      prompt_lengths=r.prompt_lengths[sl], tokens=r.tokens[sl], logprobs=r.logprobs[sl],
                                      lengths=r.lengths[sl], stopped=r.stopped[sl], responses=r.responses[sl],
                                      rewards=r.rewards[sl])
            parts.append(update_rows(sub, rc.seq_len))
            advs.append(np.asarray(group_advantages(sub.rewards, G, scale=rc.scale_advantages)))
        real = len(parts) * G
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rows["advantages"] = np.concatenate(advs).astype(np.float32)
        pad = rc.rows - real
        if pad:
            rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
        return rows, real

    def advance(step, state):
        t_step = time.perf_counter()
        kept, stats = collect(nnx.merge(graphdef, state["params"]))
        per_update, update_tokens = [], 0
        t0 = time.perf_counter()
        if kept:
            rows, real = batch_rows(kept)
            n_groups, G, M = len(kept), rc.group_size, rc.minibatch_rows
            for _ in range(rc.epochs):
                order = np.concatenate([rollout_rng.permutation(n_groups), np.arange(n_groups, rc.prompts_per_step)])
                idx = (order[:, None] * G + np.arange(G)[None]).reshape(-1)
                for m in range(rc.minibatches):
                    if m * M >= real:  # only padding left: no update on an empty minibatch
                        break
                    sel = idx[m * M:(m + 1) * M]
                    mb = {k: jax.device_put(v[sel], adv_sh if v.ndim == 1 else rows_sh) for k, v in rows.items()}
                    state, metrics = update(state, mb)
                    per_update.append(metrics)
                    update_tokens += int(rows["mask"][sel].sum())
        state = bump(state)
        if per_update:
            metrics = _reduce(per_update)
            jax.block_until_ready(metrics)
        else:
            say(f"  step {step + 1}: no group with differing rewards (all {rc.group_size} samples of every prompt "
                "scored the same): no update")
            metrics = {"skipped": 0, **jax.device_get({k: state[k] for k in ("nonfinite_total", "nonfinite_streak")})}
        dt_update = time.perf_counter() - t0
        rate = 1.0 / dt_update if per_update and dt_update > 0 else 0.0
        metrics = {**metrics, **stats, "updates_run": float(len(per_update)), "perf/update_s": dt_update,
                   # every update runs forward + backward over M rows of seq_len - 1 tokens
                   "perf/update_tokens_per_s": len(per_update) * rc.minibatch_rows * (rc.seq_len - 1) * rate,
                   "perf/update_response_tokens_per_s": update_tokens * rate}
        if (step + 1) % rc.eval_every == 0 or step + 1 == session.end:
            metrics.update(evaluate(state["params"]))
        metrics["perf/step_s"] = time.perf_counter() - t_step
        return state, metrics, source_state()

    def on_metrics(step, m):
        if "policy_loss" in m:
            losses[step] = float(m["policy_loss"])
        for k in history:
            if k in m:
                history[k][step + 1] = float(m[k])
        session.log.log(step + 1, m, timing=False)
        if clock["first_done"] is None:
            clock["first_done"] = time.perf_counter()  # the first step's time includes compilation
        else:
            clock["steps_timed"] += 1
        if (step + 1) % tc.log_every == 0 or step == session.start or step + 1 == session.end:
            rate = ""
            if clock["steps_timed"]:
                per = (time.perf_counter() - clock["first_done"]) / clock["steps_timed"]
                rate = f", {per:.2f} s/step, ETA {_fmt_time(per * (session.end - step - 1))}"
            held = (f", held-out {m['eval/reward_mean']:.3f} (greedy {m['eval/greedy_reward_mean']:.3f})"
                    if "eval/reward_mean" in m else "")
            upd = (f", clip {100 * m['is/clip_fraction']:.1f}%, grad {m['grad_norm']:.2f}, entropy {m['entropy']:.2f}"
                   if "grad_norm" in m else ", no update")
            say(
                f"rl step {step + 1}/{session.end}: reward {m['reward/mean']:.3f} (pass {100 * m['reward/pass_rate']:.0f}%)"
                f"{held}, len {m['response/length_mean']:.1f}, groups {int(m['rollout/kept_groups'])}/"
                f"{rc.prompts_per_step}{upd}, rollout {m['perf/rollout_tokens_per_s']:.0f} tok/s, update "
                f"{m['perf/update_tokens_per_s']:.0f} tok/s{rate}")

    with Signals() as signals, jax.set_mesh(mesh):
        if session.start == 0:
            first = evaluate(session.state["params"])
            for k in history:
                if k in first:
                    history[k][0] = first[k]
            session.log.log(0, first, timing=False)
            say(f"rl step 0: held-out reward {first['eval/reward_mean']:.3f} (greedy "
                f"{first['eval/greedy_reward_mean']:.3f}) on {len(held_out)} prompts")
        try:
            status, error, last_saved = run_steps(
                session, advance=advance, on_metrics=on_metrics, total_steps=tc.steps,
                checkpoint_every=tc.checkpoint_every, max_consecutive_nonfinite=tc.max_consecutive_nonfinite,
                signals=signals)
        except RewardError:
            session.log.close()
            session.ckpt.close()
            raise
    evals = history["eval/reward_mean"]
    summary = ""
    if evals:
        first_step, last_step = min(evals), max(evals)
        greedy = history["eval/greedy_reward_mean"]
        summary = (f", held-out reward {evals[first_step]:.3f} (step {first_step}) -> {evals[last_step]:.3f} "
                   f"(step {last_step}); greedy {greedy.get(first_step, float('nan')):.3f} -> "
                   f"{greedy.get(last_step, float('nan')):.3f}")
    finish(session, status, error, last_saved, total_steps=tc.steps, summary=summary)
    session.ckpt.close()
    final = int(jax.device_get(session.state["step"]))
    return RunResult(status, final, losses, int(jax.device_get(session.state["nonfinite_total"])), None, last_saved,
                     history)
