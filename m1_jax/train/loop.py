"""The training loop: setup, exact resume, the step loop, checkpoints, preemption, faults, the sample."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any

import jax
import numpy as np

import sharding
from m1_jax.config import ConfigError
from m1_jax.data.pipeline import DataIterator
from m1_jax.train import step as step_lib
from m1_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from m1_jax.train.config import RunConfig, as_dict
from m1_jax.train.metrics import MetricsLogger, device_peak_tflops, step_flops
from m1_jax.train.optimizer import make_optimizer
from m1_jax.train.sample import sample_tokens


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
    status: str  # "completed", "stopped" (stop_after), "preempted", "already_complete"
    step: int
    losses: dict[int, float]
    nonfinite_total: int
    sample: str | None
    checkpoint_step: int | None


class _Signals:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary.
    A second SIGINT interrupts immediately."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_layout(run: RunConfig, mesh) -> None:
    sizes = sharding.mesh_sizes(mesh)
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if run.data.batch_size % batch_ways:
        raise ConfigError(f"DataConfig.batch_size = {run.data.batch_size} is invalid: expected a multiple of "
                          f"data x fsdp x expert = {batch_ways} (mesh {sizes})")
    if run.data.seq_len % sizes["context"]:
        raise ConfigError(f"DataConfig.seq_len = {run.data.seq_len} is invalid: expected a multiple of "
                          f"context = {sizes['context']}")


def _saved_model_matches(saved: dict[str, Any], run: RunConfig) -> None:
    saved_model = (saved.get("config") or {}).get("model")
    if saved_model is None:
        return
    now = json.loads(json.dumps(dataclasses.asdict(run.model)))
    shape_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "num_key_value_heads", "intermediate_size", "num_local_experts", "layer_types", "param_dtype")
    diff = [f for f in shape_fields if saved_model.get(f) != now.get(f)]
    if diff:
        raise ConfigError(f"the checkpoint in {run.train.run_dir} was written for a different model: fields "
                          f"{diff} differ (checkpoint: {[saved_model.get(f) for f in diff]}, now: "
                          f"{[now.get(f) for f in diff]}); use another TrainConfig.run_dir")


_RUN_CONTROL = {"stop_after", "resume", "run_dir", "log_every", "progress_bar", "tensorboard", "sample_prompt",
                "sample_tokens", "sample_temperature", "fault_steps", "num_threads", "prefetch_buffer_size"}


def _config_changes(saved: dict[str, Any], run: RunConfig) -> list[str]:
    """Fields (other than run control) whose value differs from the checkpoint's run."""
    old = (saved.get("config") or {})
    now = json.loads(json.dumps(as_dict(run), default=str))
    out = []
    for section in ("train", "data", "optimizer"):
        for k, v in now.get(section, {}).items():
            if k in _RUN_CONTROL or section not in old or k not in old[section]:
                continue
            if old[section][k] != v:
                out.append(f"{section}.{k}: {old[section][k]!r} -> {v!r}")
    return out


def train(run: RunConfig, *, verbose: bool = True) -> RunResult:
    tc, dc, model_cfg = run.train, run.data, run.model
    is_main = jax.process_index() == 0
    say = print if (verbose and is_main) else (lambda *a, **k: None)

    # ---------------------------------------------------------------- setup (no model compute yet)
    mesh = sharding.make_mesh(run.mesh)
    _check_layout(run, mesh)
    data = DataIterator(dc, process_index=jax.process_index(), process_count=jax.process_count())
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer {dc.tokenizer!r} has {data.tokenizer.vocab_size} tokens but "
                          f"ModelConfig.vocab_size = {model_cfg.vocab_size}")
    tx, schedule = make_optimizer(run.optimizer, tc.steps)
    abs_state = step_lib.abstract_state(model_cfg, tx, tc.seed)
    shardings = step_lib.make_shardings(abs_state, mesh)
    ckpt = Checkpointer(tc.run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    latest = ckpt.latest_step()
    if tc.resume == "must" and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt.directory}")
    if tc.resume == "never" and latest is not None:
        raise ConfigError(f"TrainConfig.resume = 'never' but {ckpt.directory} already holds checkpoints "
                          f"(latest step {latest}); choose another TrainConfig.run_dir")
    os.makedirs(tc.run_dir, exist_ok=True)
    run_meta = {"operative_gin": run.operative_gin, "config": json.loads(json.dumps(as_dict(run), default=str))}
    if is_main:
        with open(os.path.join(tc.run_dir, "config.gin"), "w") as f:
            f.write(run.operative_gin)

    n = model_cfg.num_params()
    say(f"m1-jax train: preset {tc.model!r} ({n['total'] / 1e6:.2f}M params, {n['active'] / 1e6:.2f}M active "
        f"non-embedding), {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
        f"{ {k: v for k, v in sharding.mesh_sizes(mesh).items() if v > 1} or 'single device'}")
    say(f"  data: {dc.source} ({dc.tokenizer} tokenizer), batch {dc.batch_size} x {dc.seq_len} tokens; "
        f"run folder {os.path.abspath(tc.run_dir)}")

    # ---------------------------------------------------------------- state: restore or initialise
    if latest is not None:
        state, data_state, saved = ckpt.restore(latest, abstract_with_shardings(abs_state, shardings))
        _saved_model_matches(saved, run)
        changes = _config_changes(saved, run)
        if changes:
            say("  note: resuming with a config that differs from the checkpoint's (the data order and the "
                "schedule follow the new values): " + "; ".join(changes))
        data.set_state(data_state)
        start = int(jax.device_get(state["step"]))
        say(f"  resumed from {ckpt.directory}/{latest} (step {start})")
    else:
        with jax.set_mesh(mesh):
            state = jax.jit(lambda: step_lib.init_state(model_cfg, tx, tc.seed), out_shardings=shardings)()
        start = 0
    end = tc.stop_after if tc.stop_after is not None else tc.steps
    graphdef, _ = step_lib.abstract_model(model_cfg, tc.seed)

    def finish_sample(state) -> str | None:
        if tc.sample_tokens <= 0:  # every process takes part (the params may be sharded); one prints
            return None
        tok = data.tokenizer
        prompt = tok.encode(tc.sample_prompt) if tc.sample_prompt else np.asarray([0], np.int32)
        with jax.set_mesh(mesh):
            ids = sample_tokens(graphdef, state["params"], prompt, tc.sample_tokens,
                                temperature=tc.sample_temperature, seed=tc.seed)
        text = tok.decode(ids)
        say(f"\n--- sample (step {int(jax.device_get(state['step']))}, temperature {tc.sample_temperature}) ---\n"
            f"{text}\n---")
        return text

    if start >= end:
        say(f"  nothing to do: the run is at step {start} and ends at step {end}")
        sample = finish_sample(state) if start >= tc.steps else None
        ckpt.close()
        return RunResult("already_complete", start, {}, int(jax.device_get(state["nonfinite_total"])), sample,
                         latest)

    train_step = step_lib.make_train_step(
        graphdef, tx, schedule, aux_loss_coef=model_cfg.router_aux_loss_coef,
        z_loss_coef=run.optimizer.z_loss_coef, loss_chunk_size=tc.loss_chunk_size, head_dtype=tc.head_dtype,
        use_segment_ids=tc.use_segment_ids, fault_steps=tc.fault_steps)
    step_fn = step_lib.jit_train_step(train_step, shardings, mesh)
    batch_sh = sharding.batch_sharding(mesh, 2)

    peak = tc.peak_tflops or device_peak_tflops()
    log = MetricsLogger(tc.run_dir, total_steps=end, start_step=start,
                        flops_per_step=step_flops(model_cfg, dc.batch_size, dc.seq_len),
                        tokens_per_step=dc.batch_size * dc.seq_len, peak_tflops=peak,
                        progress_bar=tc.progress_bar and verbose, tensorboard=tc.tensorboard, is_main=is_main,
                        console=verbose)

    losses: dict[int, float] = {}
    status = "completed" if end == tc.steps else "stopped"
    last_saved = latest
    pending = None  # (step, metrics) of the step dispatched before the current one
    error: Exception | None = None

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}

    def consume(step: int, metrics) -> None:
        nonlocal error
        m = jax.device_get(metrics)
        losses[step] = float(m["loss"])
        if int(m["skipped"]):
            log.write(f"step {step}: non-finite loss/gradient (loss {float(m['loss'])}, grad norm "
                      f"{float(m['grad_norm'])}): update skipped ({int(m['nonfinite_total'])} skipped so far)")
        if int(m["nonfinite_streak"]) >= tc.max_consecutive_nonfinite and error is None:
            error = NonFiniteError(
                f"{int(m['nonfinite_streak'])} consecutive steps (up to step {step}) had a non-finite loss or "
                f"gradient (TrainConfig.max_consecutive_nonfinite = {tc.max_consecutive_nonfinite}); stopping. "
                f"The last good checkpoint ({last_saved if last_saved is not None else 'none'}) is intact in "
                f"{ckpt.directory}. Lower OptimizerConfig.learning_rate or check the data.")
        if (step + 1) % tc.log_every == 0 or step == start or step + 1 == end:
            log.log(step + 1, m, timing=step != start)  # the first step's window includes compilation
            if step == start:
                log.reset_timer(step + 1)

    with _Signals() as sig, jax.set_mesh(mesh):
        step = start
        while step < end:
            batch = next(data)
            data_state = data.get_state()
            state, metrics = step_fn(state, to_global(batch))
            if pending is not None:
                consume(*pending)
            pending = (step, metrics)
            step += 1
            if error is not None:
                break
            if step % tc.checkpoint_every == 0 or step == end or sig.received is not None:
                consume(*pending)
                pending = None
                if error is not None:
                    break
                ckpt.save(step, state, data_state, run_meta, force=True)
                last_saved = step
            if sig.received is not None:
                status = "preempted"
                log.write(f"received {signal.Signals(sig.received).name}: saved a checkpoint at step {step}; "
                          "run the same command again to resume")
                break
        if pending is not None and error is None:
            consume(*pending)
        ckpt.wait()
        log.close()
        if error is not None:
            ckpt.close()
            raise error
        final_step = int(jax.device_get(state["step"]))
        nonfinite = int(jax.device_get(state["nonfinite_total"]))
        sample = finish_sample(state) if status == "completed" else None
        if sample is not None:
            log.add_text("sample", sample, final_step)
    ckpt.close()
    if status == "completed":
        say(f"done: step {final_step}, final loss {losses.get(final_step - 1, float('nan')):.4f}, "
            f"checkpoint {ckpt.directory}/{last_saved}" + (f", {nonfinite} steps skipped" if nonfinite else ""))
    return RunResult(status, final_step, losses, nonfinite, sample, last_saved)
