"""The RL update step: the policy loss (by name) on one minibatch of rollout rows, AdamW, and the
non-finite rule of pretraining (a step whose loss or gradient norm is not finite keeps the parameters
and optimizer state, bitwise, and is counted).

The state is the pretraining state dict (``params``, ``opt_state``, ``step``, ``rng``, ``nonfinite_total``,
``nonfinite_streak``) plus ``updates`` (optimizer updates so far), so RL checkpoints load wherever training
checkpoints do; ``step`` counts RL steps (rollouts) and is advanced by the loop, not here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sharding
from m1_jax.model import load_balancing_loss
from m1_jax.rl.logprobs import policy_logprobs
from m1_jax.rl.losses import clip_fraction, dropped_fraction, loss_bounds, policy_loss
from m1_jax.train.optimizer import global_norm


def initial_state(params, tx, seed: int) -> dict[str, Any]:
    """A fresh RL state around ``params`` (pure: jit it with the state shardings)."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "updates": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed + 1)),
            "nonfinite_total": jnp.zeros((), jnp.int32), "nonfinite_streak": jnp.zeros((), jnp.int32)}


def _masked_stats(x, mask):
    n = jnp.maximum(jnp.sum(mask), 1.0)
    big = jnp.finfo(jnp.float32).max
    return (jnp.sum(x * mask) / n, jnp.max(jnp.where(mask > 0, x, -big)), jnp.min(jnp.where(mask > 0, x, big)))


def make_update_step(graphdef, tx, schedule, *, loss: str, eps_low: float | None, eps_high: float | None,
                     aux_loss_coef: float, chunk_size: int, fault_updates: Sequence[int] = ()) -> Callable:
    """``update(state, minibatch) -> (state, metrics)``; ``minibatch``: ``inputs, targets, mask, old_logp``
    ``[M, T]`` and ``advantages [M]``. ``fault_updates``: optimizer-update indices whose loss and gradients
    are NaN (tests of the non-finite handling)."""
    lo, hi = loss_bounds(loss, eps_low, eps_high)
    fault = jnp.asarray(sorted(set(int(s) for s in fault_updates)) or [-1], jnp.int32)

    def objective(params, mb, count):
        model = nnx.merge(graphdef, params)
        logp, entropy, stats = policy_logprobs(model, mb["inputs"], mb["targets"], chunk_size=chunk_size)
        pl = policy_loss(loss, logp, mb["old_logp"], mb["advantages"], mb["mask"], eps_low=lo, eps_high=hi)
        aux = load_balancing_loss(stats)
        total = (pl + aux_loss_coef * aux) * jnp.where(jnp.any(fault == count), jnp.nan, 1.0)
        return total, (pl, aux, logp, entropy)

    def update(state, mb):
        params, count = state["params"], state["updates"]
        (total, (pl, aux, logp, entropy)), grads = jax.value_and_grad(objective, has_aux=True)(params, mb, count)
        gnorm = global_norm(grads)
        ok = jnp.isfinite(total) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {
            **state,
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "updates": count + 1,
            "nonfinite_total": state["nonfinite_total"] + (~ok).astype(jnp.int32),
            "nonfinite_streak": jnp.where(ok, 0, state["nonfinite_streak"] + 1).astype(jnp.int32),
        }
        mask, old = mb["mask"], mb["old_logp"]
        log_ratio = jnp.clip(logp - old, -20.0, 20.0)
        ratio = jnp.exp(log_ratio)
        r_mean, r_max, r_min = _masked_stats(ratio, mask)
        diff_mean, diff_max, _ = _masked_stats(jnp.abs(logp - old), mask)
        metrics = {
            "loss": total, "policy_loss": pl, "aux_loss": aux, "grad_norm": gnorm, "lr": schedule(count),
            "entropy": _masked_stats(entropy, mask)[0], "tokens": jnp.sum(mask),
            "is/ratio_mean": r_mean, "is/ratio_max": r_max, "is/ratio_min": r_min,
            "is/clip_fraction": clip_fraction(logp, old, mask, eps_low=lo, eps_high=hi),
            "is/ppo_dropped_fraction": dropped_fraction(logp, old, mb["advantages"], mask, eps_low=lo, eps_high=hi),
            "mismatch/logp_abs_mean": diff_mean, "mismatch/logp_abs_max": diff_max,
            "mismatch/prob_corr": _masked_corr(jnp.exp(logp), jnp.exp(old), mask),
            "skipped": (~ok).astype(jnp.int32), "nonfinite_total": new_state["nonfinite_total"],
            "nonfinite_streak": new_state["nonfinite_streak"],
        }
        return new_state, jax.tree.map(jax.lax.stop_gradient, metrics)

    return update


def _masked_corr(a, b, mask):
    """Pearson correlation of ``a`` and ``b`` over the masked entries (the M1 paper's trainer-vs-sampler
    probability check)."""
    n = jnp.maximum(jnp.sum(mask), 1.0)
    ma, mb = jnp.sum(a * mask) / n, jnp.sum(b * mask) / n
    da, db = (a - ma) * mask, (b - mb) * mask
    return jnp.sum(da * db) / jnp.maximum(jnp.sqrt(jnp.sum(da * da) * jnp.sum(db * db)), 1e-30)


def jit_update(update, state_shardings, mesh):
    rows = sharding.batch_sharding(mesh, 2)
    mb_sh = {"inputs": rows, "targets": rows, "mask": rows, "old_logp": rows,
             "advantages": sharding.batch_sharding(mesh, 1)}
    return jax.jit(update, in_shardings=(state_shardings, mb_sh), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))


def jit_bump(state_shardings):
    """``state -> state`` with ``step + 1`` (one RL step done), in the state's layout."""
    return jax.jit(lambda s: {**s, "step": s["step"] + 1}, in_shardings=(state_shardings,),
                   out_shardings=state_shardings, donate_argnums=(0,))
