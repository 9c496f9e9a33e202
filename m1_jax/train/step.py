"""Train state, its initialisation and shardings, and the jitted train step.

The state is a plain dict (an Orbax-friendly pytree)::

    {"params": nnx.State (Param variables), "opt_state": optax state, "step": int32,
     "rng": uint32 key data, "nonfinite_total": int32, "nonfinite_streak": int32}

``step`` counts optimizer steps taken *including skipped ones* (it is the data position); a step whose
loss or gradient norm is not finite leaves params and optimizer state unchanged and increments both
non-finite counters; a finite step resets the streak.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sharding
from m1_jax.config import ModelConfig
from m1_jax.model import MiniMaxForCausalLM, abstract_model, load_balancing_loss  # noqa: F401 (abstract_model: callers use step.abstract_model)
from m1_jax.model.compute_weights import cast_params
from m1_jax.train.loss import chunked_cross_entropy
from m1_jax.train.optimizer import global_norm


def init_state(config: ModelConfig, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    model = MiniMaxForCausalLM(config, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed + 1)),
        "nonfinite_total": jnp.zeros((), jnp.int32),
        "nonfinite_streak": jnp.zeros((), jnp.int32),
    }


def abstract_state(config: ModelConfig, tx, seed: int = 0):
    return jax.eval_shape(lambda: init_state(config, tx, seed))


def make_shardings(abstract, mesh):
    return sharding.state_shardings(abstract, mesh)


def create_state(config: ModelConfig, tx, seed: int, mesh):
    """Initialise the train state directly in its sharded layout on ``mesh``."""
    abs_state = abstract_state(config, tx, seed)
    shardings = make_shardings(abs_state, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: init_state(config, tx, seed), out_shardings=shardings)()
    return state, shardings


def expert_load(stats) -> dict[str, jax.Array]:
    """Load balance from the router statistics: per layer, the share of routed tokens each expert gets
    times the number of experts (1.0 everywhere = perfectly balanced). Returns the mean over layers of
    the most and least loaded expert's value, and the worst layer's maximum."""
    f = jnp.mean(stats.tokens_per_expert, axis=1)  # [L, E]: sums to 1 over E
    E = f.shape[-1]
    load = f * E
    return {"moe/max_load": jnp.mean(jnp.max(load, -1)), "moe/min_load": jnp.mean(jnp.min(load, -1)),
            "moe/worst_layer_max_load": jnp.max(load)}


def cast_params_once(params, dtype: str, *, keep_head: bool):
    """The parameter tree in the compute dtype, cast once per step before the forward (the
    ``cast_params`` alternative to each layer casting its float32 weights at every use). The router
    stays float32, and the LM head when the head runs in float32; gradients flow back through the
    cast to the float32 master weights."""
    return cast_params(params, dtype, keep_head=keep_head)


def _split_microbatches(batch, n: int):
    """``[B, ...]`` -> ``[n, B / n, ...]``, microbatch i = rows i, i + n, ... (each keeps the batch sharding)."""
    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"microbatches = {n} must divide the batch size {x.shape[0]}")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def make_train_step(graphdef, tx, schedule, *, aux_loss_coef: float, z_loss_coef: float,
                    loss_chunk_size: int, head_dtype: str, use_segment_ids: bool = True,
                    fault_steps: Sequence[int] = (), microbatches: int = 1,
                    cast_params: str | None = None) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` (pure; jit it with shardings).

    ``fault_steps``: steps whose loss and gradients are NaN (fault-injection for tests of the non-finite
    handling; empty in real runs). ``microbatches``: gradient accumulation, the batch split into that
    many microbatches whose gradients are summed (a ``lax.scan``) before one optimizer update: the
    token-weighted mean cross-entropy of the whole batch, the load-balancing loss averaged over the
    microbatches. ``cast_params``: a dtype name to cast the parameter tree to once per step
    (``cast_params_once``); None lets every layer cast at use.
    """
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches = {microbatches!r}: expected a positive integer")
    fault = jnp.asarray(sorted(set(int(s) for s in fault_steps)) or [-1], jnp.int32)

    def loss_fn(params, batch, step, weight):
        """This microbatch's share of the objective (``weight`` = its share of the batch's tokens)."""
        if cast_params is not None:
            params = cast_params_once(params, cast_params, keep_head=head_dtype == "float32")
        model = nnx.merge(graphdef, params)
        seg = batch["segment_ids"] if use_segment_ids else None
        h, stats = model.hidden_states(batch["inputs"], segment_ids=seg)
        ce_obj, m = chunked_cross_entropy(h, model.lm_head.value, batch["targets"], batch["loss_mask"],
                                          z_loss_coef=z_loss_coef, chunk_size=loss_chunk_size,
                                          head_dtype=head_dtype)
        aux = load_balancing_loss(stats)
        loss = weight * ce_obj + (aux_loss_coef / microbatches) * aux
        loss = loss * jnp.where(jnp.any(fault == step), jnp.nan, 1.0)  # NaN loss and NaN gradients
        return loss, (m, aux, stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated(params, batch, step):
        if microbatches == 1:
            return grad_fn(params, batch, step, 1.0)
        mbs = _split_microbatches(batch, microbatches)
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

        def body(acc, mb):
            w = jnp.maximum(jnp.sum(mb["loss_mask"].astype(jnp.float32)), 1.0) / total
            (loss, (m, aux, stats)), g = grad_fn(params, mb, step, w)
            g_acc, l_acc = acc
            g_acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g)
            return (g_acc, l_acc + loss), (w, m, aux, stats)

        g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32 if jnp.issubdtype(p.dtype, jnp.floating)
                                              else p.dtype), params)
        (grads, loss), (w, m, aux, stats) = jax.lax.scan(body, (g0, jnp.zeros((), jnp.float32)), mbs)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        m = {"ce": jnp.sum(w * m["ce"]), "z_loss": jnp.sum(w * m["z_loss"]), "tokens": jnp.sum(m["tokens"])}
        stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
        return (loss, (m, jnp.mean(aux), stats)), grads

    def train_step(state, batch):
        params, step = state["params"], state["step"]
        (loss, (m, aux, stats)), grads = accumulated(params, batch, step)
        gnorm = global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        streak = jnp.where(ok, 0, state["nonfinite_streak"] + 1)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": step + 1,
            "rng": state["rng"],
            "nonfinite_total": state["nonfinite_total"] + (~ok).astype(jnp.int32),
            "nonfinite_streak": streak.astype(jnp.int32),
        }
        metrics = {
            "loss": loss, "ce": m["ce"], "aux_loss": aux, "z_loss": m["z_loss"], "grad_norm": gnorm,
            "lr": schedule(step), "tokens": m["tokens"], "skipped": (~ok).astype(jnp.int32),
            "nonfinite_total": new_state["nonfinite_total"], "nonfinite_streak": new_state["nonfinite_streak"],
            **expert_load(stats),
        }
        return new_state, metrics

    return train_step


def jit_train_step(train_step, state_shardings, mesh, batch_ndim: int = 2):
    bs = sharding.batch_sharding(mesh, batch_ndim)
    batch_sh = {"inputs": bs, "targets": bs, "segment_ids": bs, "loss_mask": bs}
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
