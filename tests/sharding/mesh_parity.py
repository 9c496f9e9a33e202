"""Forward logits and gradients of a small model on several meshes vs one device (run as a script).

Run with fake CPU devices, e.g.::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding/mesh_parity.py \
        "fsdp=8" "data=2,fsdp=2,tensor=2" "expert=4,data=2,fsdp=1:ep_capacity"

Each argument is a MeshConfig string, optionally ``:moe_impl``. Prints one JSON line per mesh with the
max relative errors of the logits, the loss and the gradients, the collectives found in the lowered
program, and the sharding of a few parameters.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax import ModelConfig, MiniMaxForCausalLM
from m1_jax.config import FULL, LINEAR
from sharding import MeshConfig, batch_sharding, make_mesh, state_shardings

# 2 blocks of (lightning, softmax): lightning, softmax, MoE and the layer scan all appear.
CFG = dict(num_hidden_layers=4, layer_types=(LINEAR, FULL, LINEAR, FULL), block_size=8)
B, T = 8, 32


def loss_fn(model, ids, seg):
    logits, aux = model(ids, segment_ids=seg, return_aux=True)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return nll + 0.01 * aux, logits


def build(moe_impl: str):
    c = ModelConfig.preset("tiny", **CFG, moe_impl=moe_impl, moe_capacity_factor=-1.0)
    model = MiniMaxForCausalLM(c, rngs=nnx.Rngs(0))
    return nnx.split(model)


def step(graphdef, state, ids, seg):
    def f(st):
        return loss_fn(nnx.merge(graphdef, st), ids, seg)

    (loss, logits), grads = jax.value_and_grad(f, has_aux=True)(state)
    return loss, logits, grads


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(specs: list[str]) -> None:
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
    # packed rows: documents of varying length, boundaries inside and across context shards
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=b % 4, replace=False))
        for cpos in cuts:
            seg[b, cpos:] += 1
    seg = jnp.asarray(seg)
    graphdef, state = build("ragged")
    ref_loss, ref_logits, ref_grads = jax.jit(step, static_argnums=0)(graphdef, state, ids, seg)
    ref_g = jax.tree.leaves(ref_grads)
    for spec in specs:
        mesh_str, _, impl = spec.partition(":")
        impl = impl or "ragged"
        mesh = make_mesh(MeshConfig.from_string(mesh_str))
        gd, st = build(impl)
        shard = state_shardings(st, mesh)
        st = jax.device_put(st, shard)
        bs = batch_sharding(mesh, shape=ids.shape)
        ids_s, seg_s = jax.device_put(ids, bs), jax.device_put(seg, bs)
        fn = jax.jit(step, static_argnums=0, in_shardings=(shard, bs, bs),
                     out_shardings=(None, None, shard))
        with jax.set_mesh(mesh):
            loss, logits, grads = fn(gd, st, ids_s, seg_s)
            hlo = fn.lower(gd, st, ids_s, seg_s).as_text()
        g = jax.tree.leaves(grads)
        grad_err = max(rel(a, b) for a, b in zip(g, ref_g))
        w1 = st["blocks"]["layers"][0]["block_sparse_moe"]["w1"].get_value()
        emb = st["embed_tokens"].get_value()
        out = {
            "mesh": mesh_str, "moe_impl": impl, "sizes": dict(mesh.shape),
            "logits_rel": rel(logits, ref_logits), "loss_abs": abs(float(loss) - float(ref_loss)),
            "grad_rel": grad_err,
            "collectives": sorted({c for c in ("all_to_all", "all_gather", "all_reduce", "reduce_scatter",
                                               "collective_permute") if c in hlo}),
            "w1_spec": str(w1.sharding.spec), "embed_spec": str(emb.sharding.spec),
            "logits_spec": str(logits.sharding.spec),
        }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main(sys.argv[1:])
