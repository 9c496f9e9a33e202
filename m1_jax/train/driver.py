"""The step loop and the finish shared by pretraining and RL.

:func:`run_steps` drives steps ``[session.start, session.end)``: each step is dispatched by the caller's
``advance`` (one optimizer step for pretraining; a rollout and its minibatch updates for RL), its metrics
are read one step later (the host never waits on the device between steps), non-finite steps are
reported and counted, checkpoints are written every ``checkpoint_every`` steps, at the end and on
SIGTERM/SIGINT (then the loop stops). :func:`finish` waits for the checkpoints, closes the logger and
says what happened and how to continue.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from m1_jax.train.setup import Session
from m1_jax.train.signals import Signals


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
    history: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # RL: eval rewards, ...


# advance(step, state) -> (new state, metrics (device values), source state to save with the new state)
Advance = Callable[[int, Any], tuple[Any, Any, Any]]


def run_steps(session: Session, *, advance: Advance, on_metrics: Callable[[int, dict[str, Any]], None],
              total_steps: int, checkpoint_every: int, max_consecutive_nonfinite: int, signals: Signals) -> tuple[str, Exception | None, int | None]:
    """Run the steps; returns ``(status, error, last checkpoint step)``. ``on_metrics(step, host metrics)``
    logs a finished step. ``error`` (a :class:`NonFiniteError`) means: stop, the last checkpoint is good."""
    ckpt, log = session.ckpt, session.log
    status = "completed" if session.end == total_steps else "stopped"
    last_saved = session.resumed_from
    pending = None  # (step, metrics) of the step dispatched before the current one
    error: Exception | None = None

    def consume(step: int, metrics) -> None:
        nonlocal error
        m = jax.device_get(metrics)
        if int(m["skipped"]):
            log.write(f"step {step}: non-finite loss/gradient (loss {float(m['loss'])}, grad norm "
                      f"{float(m['grad_norm'])}): update skipped ({int(m['nonfinite_total'])} skipped so far)")
        if int(m["nonfinite_streak"]) >= max_consecutive_nonfinite and error is None:
            error = NonFiniteError(
                f"{int(m['nonfinite_streak'])} consecutive steps (up to step {step}) had a non-finite loss or "
                f"gradient (TrainConfig.max_consecutive_nonfinite = {max_consecutive_nonfinite}); stopping. "
                f"The last good checkpoint ({last_saved if last_saved is not None else 'none'}) is intact in "
                f"{ckpt.directory}. Lower OptimizerConfig.learning_rate or check the data.")
        on_metrics(step, m)

    step = session.start
    while step < session.end:
        session.state, metrics, source_state = advance(step, session.state)
        if pending is not None:
            consume(*pending)
        pending = (step, metrics)
        step += 1
        if error is not None:
            break
        if step % checkpoint_every == 0 or step == session.end or signals.received is not None:
            consume(*pending)
            pending = None
            if error is not None:
                break
            ckpt.save(step, session.state, source_state, session.run_meta, force=True)
            last_saved = step
        if signals.received is not None:
            status = "preempted"
            log.write(f"received {signals.name}: saved a checkpoint at step {step}; run the same command "
                      "again to resume")
            break
    if pending is not None and error is None:
        consume(*pending)
    return status, error, last_saved


def finish(session: Session, status: str, error: Exception | None, last_saved: int | None, *,
           total_steps: int, summary: str = "") -> None:
    """Wait for the checkpoints and close the logger; raise ``error``; say how the run ended."""
    session.ckpt.wait()
    if session.log is not None:
        session.log.close()
    if error is not None:
        session.ckpt.close()
        raise error
    step = int(jax.device_get(session.state["step"]))
    where = f"{session.ckpt.directory}/{last_saved}" if last_saved is not None else "none"
    if status == "completed":
        session.say(f"done: step {step}{summary}, checkpoint {where}")
    elif status == "stopped":
        session.say(f"stopped at step {step} of {total_steps} (TrainConfig.stop_after = {session.end}); checkpoint "
                    f"{where}. To continue, run the same command without TrainConfig.stop_after (or with a larger "
                    "one): it resumes from that checkpoint.")


def already_complete_message(session: Session, total_steps: int) -> str:
    if session.start >= total_steps:
        return f"  nothing to do: the run is complete (step {session.start} of {total_steps})"
    return (f"  nothing to do: the run is at step {session.start} and this invocation stops at step {session.end} "
            f"(TrainConfig.stop_after); raise or remove TrainConfig.stop_after to continue")
