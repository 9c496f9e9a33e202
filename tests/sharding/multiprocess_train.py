"""A few SGD steps of a small model, on one process or as one of several ``jax.distributed`` processes.

Single process, one device (the reference)::

    python tests/sharding/multiprocess_train.py --out ref.npz

Two processes on this machine, 2 fake CPU devices each, one mesh ``data=2, fsdp=2`` over all four::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharding/multiprocess_train.py \
        --coordinator localhost:PORT --num-processes 2 --process-id 0 --mesh data=2,fsdp=2 --out multi.npz &
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharding/multiprocess_train.py \
        --coordinator localhost:PORT --num-processes 2 --process-id 1 --mesh data=2,fsdp=2

Process 0 writes the per-step losses and the final parameters (gathered to the host) to ``--out``.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--mesh", default=None, help="MeshConfig string; default: no mesh (one device)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")

    from sharding import MeshConfig, batch_sharding, initialize_distributed, make_mesh, put_global, state_shardings

    if args.coordinator:
        assert initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        assert jax.process_count() == args.num_processes

    import jax.numpy as jnp
    import optax
    from flax import nnx

    from m1_jax import ModelConfig, MiniMaxForCausalLM
    from m1_jax.config import FULL, LINEAR

    c = ModelConfig.preset("tiny", num_hidden_layers=4, layer_types=(LINEAR, FULL, LINEAR, FULL), block_size=8)
    model = MiniMaxForCausalLM(c, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(0.3, momentum=0.9)
    opt_state = tx.init(params)
    B, T = 8, 32
    # a learnable pattern (arithmetic sequences), a fresh offset each step
    batches = [((np.arange(B)[:, None] * 7 + np.arange(T)[None, :] * 3 + s) % 64).astype(np.int32)
               for s in range(args.steps)]

    def loss_fn(p, ids):
        logits, aux = nnx.merge(graphdef, p)(ids, return_aux=True)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)) + 0.01 * aux

    def step(p, o, ids):
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    if args.mesh:
        mesh = make_mesh(MeshConfig.from_string(args.mesh))
        p_sh, o_sh = state_shardings(params, mesh), state_shardings(opt_state, mesh)
        b_sh = batch_sharding(mesh, shape=(B, T))
        params, opt_state = put_global(params, p_sh), put_global(opt_state, o_sh)
        train = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, None),
                        donate_argnums=(0, 1))
        batches = [put_global(b, b_sh) for b in batches]
        with jax.set_mesh(mesh):
            losses = []
            for b in batches:
                params, opt_state, loss = train(params, opt_state, b)
                losses.append(float(loss))
        from jax.experimental import multihost_utils

        host = multihost_utils.process_allgather(jax.tree.leaves(params), tiled=True)
    else:
        train = jax.jit(step)
        losses = []
        for b in batches:
            params, opt_state, loss = train(params, opt_state, jnp.asarray(b))
            losses.append(float(loss))
        host = [np.asarray(x) for x in jax.tree.leaves(params)]
    print("losses", losses, flush=True)
    if args.out and jax.process_index() == 0:
        np.savez(args.out, losses=np.asarray(losses), **{f"p{i}": np.asarray(x) for i, x in enumerate(host)})
    if args.coordinator:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
