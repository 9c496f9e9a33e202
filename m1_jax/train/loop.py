"""Pretraining: the shared setup (:mod:`m1_jax.train.setup`), the step loop and finish
(:mod:`m1_jax.train.driver`) around the jitted train step (:mod:`m1_jax.train.step`)."""

from __future__ import annotations

import json

import jax

import sharding
from m1_jax.config import ConfigError
from m1_jax.train import step as step_lib
from m1_jax.train.config import RunConfig, as_dict
from m1_jax.train.driver import NonFiniteError, RunResult, already_complete_message, finish, run_steps
from m1_jax.train.metrics import MetricsLogger, device_peak_tflops, step_flops
from m1_jax.train.optimizer import make_optimizer
from m1_jax.train.sample import print_sample
from m1_jax.train.setup import check_batch_layout, console, find_resume, jit_init, mesh_summary, open_run
from m1_jax.train.signals import Signals

__all__ = ["NonFiniteError", "RunResult", "train"]


def train(run: RunConfig, *, verbose: bool = True, source=None) -> RunResult:
    """Pretrain ``run``. ``source``: the batch source (default: ``DataIterator(run.data)``); anything with
    ``tokenizer``, ``__next__`` (a dict of ``inputs, targets, segment_ids, loss_mask`` ``[batch, seq_len]``
    arrays for this host), ``get_state()`` (JSON-able) and ``set_state(state)``."""
    tc, dc, model_cfg = run.train, run.data, run.model
    say = console(verbose)

    # ---------------------------------------------------------------- checks (nothing is written yet)
    mesh = sharding.make_mesh(run.mesh)
    check_batch_layout(mesh, dc.batch_size, dc.seq_len)
    if source is None:
        from m1_jax.data.pipeline import DataIterator

        source = DataIterator(dc, process_index=jax.process_index(), process_count=jax.process_count())
    if source.tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer {dc.tokenizer!r} has {source.tokenizer.vocab_size} tokens but "
                          f"ModelConfig.vocab_size = {model_cfg.vocab_size}")
    tx, schedule = make_optimizer(run.optimizer, tc.steps)
    abs_state = step_lib.abstract_state(model_cfg, tx, tc.seed)
    shardings = step_lib.make_shardings(abs_state, mesh)
    resume = find_resume(tc, model_cfg)

    # ---------------------------------------------------------------- run folder, state, logger
    now = json.loads(json.dumps(as_dict(run), default=str))
    session = open_run(run, mesh=mesh, resume=resume, abstract_state=abs_state, shardings=shardings,
                       init_state=lambda: jit_init(lambda: step_lib.init_state(model_cfg, tx, tc.seed), shardings, mesh),
                       run_meta={"operative_gin": run.operative_gin, "config": now}, say=say, as_dict_now=now)
    n = model_cfg.num_params()
    say(f"m1-jax train: preset {tc.model!r} ({n['total'] / 1e6:.2f}M params, {n['active'] / 1e6:.2f}M active "
        f"non-embedding), {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {mesh_summary(mesh)}")
    say(f"  data: {dc.source} ({dc.tokenizer} tokenizer), batch {dc.batch_size} x {dc.seq_len} tokens; "
        f"run folder {session.ckpt.directory[:-len('/checkpoints')]}")
    if session.source_state is not None:
        source.set_state(session.source_state)
    graphdef, _ = step_lib.abstract_model(model_cfg, tc.seed)

    def sample(state):
        return print_sample(graphdef, state, source.tokenizer, tc, mesh, say)

    if session.start >= session.end:
        say(already_complete_message(session, tc.steps))
        text = sample(session.state) if session.start >= tc.steps else None
        session.ckpt.close()
        return RunResult("already_complete", session.start, {}, int(jax.device_get(session.state["nonfinite_total"])),
                         text, session.resumed_from)

    # ---------------------------------------------------------------- the step loop
    train_step = step_lib.make_train_step(
        graphdef, tx, schedule, aux_loss_coef=model_cfg.router_aux_loss_coef,
        z_loss_coef=run.optimizer.z_loss_coef, loss_chunk_size=tc.loss_chunk_size, head_dtype=tc.head_dtype,
        use_segment_ids=tc.use_segment_ids, fault_steps=tc.fault_steps, microbatches=tc.microbatches,
        cast_params=tc.cast_params)
    step_fn = step_lib.jit_train_step(train_step, shardings, mesh)
    batch_sh = sharding.batch_sharding(mesh, 2)
    session.log = MetricsLogger(tc.run_dir, total_steps=session.end, start_step=session.start,
                                flops_per_step=step_flops(model_cfg, dc.batch_size, dc.seq_len),
                                tokens_per_step=dc.batch_size * dc.seq_len, peak_tflops=tc.peak_tflops or device_peak_tflops(),
                                progress_bar=tc.progress_bar and verbose, tensorboard=tc.tensorboard,
                                is_main=session.is_main, console=verbose)
    losses: dict[int, float] = {}

    def advance(step, state):
        batch = next(source)
        source_state = source.get_state()
        batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}
        state, metrics = step_fn(state, batch)
        return state, metrics, source_state

    def on_metrics(step, m):
        losses[step] = float(m["loss"])
        if (step + 1) % tc.log_every == 0 or step == session.start or step + 1 == session.end:
            session.log.log(step + 1, m, timing=step != session.start)  # the first window includes compilation
            if step == session.start:
                session.log.reset_timer(step + 1)

    with Signals() as signals, jax.set_mesh(mesh):
        status, error, last_saved = run_steps(session, advance=advance, on_metrics=on_metrics, total_steps=tc.steps,
                                              checkpoint_every=tc.checkpoint_every,
                                              max_consecutive_nonfinite=tc.max_consecutive_nonfinite, signals=signals)
    final = int(jax.device_get(session.state["step"]))
    nonfinite = int(jax.device_get(session.state["nonfinite_total"]))
    summary = f", final loss {losses.get(final - 1, float('nan')):.4f}" + (
        f", {nonfinite} steps skipped" if nonfinite else "")
    text = sample(session.state) if status == "completed" and error is None else None
    if text is not None:
        session.log.add_text("sample", text, final)
    finish(session, status, error, last_saved, total_steps=tc.steps, summary=summary)
    session.ckpt.close()
    return RunResult(status, final, losses, nonfinite, text, last_saved)
