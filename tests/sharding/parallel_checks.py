"""Unit checks of the shard_map pieces on fake CPU devices (run as a script; prints one JSON line each).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding/parallel_checks.py

* the MoE layer's expert-parallel implementations (``m1_jax.model.moe.moe_forward``: capacity dispatch
  with and without dropped tokens, and the dropless ragged one over an emulated ragged_all_to_all) vs
  an independent per-expert loop (its own routing and capacity rule, per source shard): outputs,
  gradients and the dropped fraction;
* LASP-2 lightning attention vs the single-device reference, with packed documents and an initial
  state, outputs, final state and gradients;
* context-parallel softmax attention (all-gather K/V) vs single-device attention.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from m1_jax.model.moe import moe_forward
from m1_jax.model.softmax_attention import causal_attention
from sharding import MeshConfig, make_mesh
from sharding.context_parallel import causal_attention as cp_attention
from sharding.context_parallel import lightning_attention as cp_lightning
from sharding.moe_dispatch import ragged_all_to_all_emulated


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def oracle_choices(x, gate, top_k, cf, groups):
    """The discrete part of the MoE, in float64 NumPy from the definition (none of the implementation's
    routing or capacity code): tokens are split into ``groups`` contiguous source shards (the batch
    sharding); per shard, top-k of the softmax router, and ``C = ceil(cf * N * k / E)`` slots per expert
    (at least 1, at most N; ``cf <= 0``: N) filled by first choices, then second choices, in token order.
    Returns (top [groups, N, k] expert ids, keep [groups, N, k] bool)."""
    B, T, H = x.shape
    E = gate.shape[1]
    xg = np.asarray(x, np.float64).reshape(groups, (B // groups) * T, H)
    tops, keeps = [], []
    for g in range(groups):
        logits = xg[g] @ np.asarray(gate, np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        N = top.shape[0]
        C = N if cf <= 0 else max(1, min(N, int(np.ceil(cf * N * top_k / E))))
        used = np.zeros(E, int)
        keep = np.zeros((N, top_k), bool)
        for j in range(top_k):
            for n in range(N):
                if used[top[n, j]] < C:
                    keep[n, j] = True
                    used[top[n, j]] += 1
        tops.append(top)
        keeps.append(keep)
    return np.stack(tops), np.stack(keeps)


def moe_oracle(x, gate, w1, w3, w2, choices):
    """Per-expert loop over the oracle's choices (jnp, so that it can be differentiated: the routing
    weights are the renormalised softmax probabilities of the chosen experts). Returns (y, dropped)."""
    top, keep = choices
    groups, N, k = top.shape
    B, T, H = x.shape
    E = w1.shape[0]
    xg = x.reshape(groups, N, H)
    ys = []
    for g in range(groups):
        xf = xg[g]
        probs = jax.nn.softmax(jnp.dot(xf, gate, precision="highest"), axis=-1)
        w = jnp.take_along_axis(probs, jnp.asarray(top[g]), axis=1)
        w = w / jnp.sum(w, axis=1, keepdims=True)
        y = jnp.zeros((N, H), jnp.float32)
        for ex in range(E):
            h = jax.nn.silu(jnp.dot(xf, w1[ex], precision="highest")) * jnp.dot(xf, w3[ex], precision="highest")
            out = jnp.dot(h, w2[ex], precision="highest")
            coef = jnp.sum(jnp.where(jnp.asarray((top[g] == ex) & keep[g]), w, 0.0), axis=1)
            y = y + coef[:, None] * out
        ys.append(y)
    return jnp.concatenate(ys).reshape(B, T, H), 1.0 - keep.mean()


def check_moe():
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    B, T, H, E, I, k = 8, 8, 16, 8, 12, 2
    x = jax.random.normal(ks[0], (B, T, H))
    gate = jax.random.normal(ks[1], (H, E))
    w1 = jax.random.normal(ks[2], (E, H, I)) * 0.3
    w3 = jax.random.normal(ks[3], (E, H, I)) * 0.3
    w2 = jax.random.normal(ks[4], (E, I, H)) * 0.3
    for mesh_str in ("expert=4,data=2,fsdp=1", "expert=2,tensor=2,fsdp=2", "tensor=2,fsdp=4"):
        mesh = make_mesh(MeshConfig.from_string(mesh_str))
        groups = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
        for cf in ((-1.0, 1.0) if mesh.shape["expert"] > 1 else ()):
            def f(x, gate, w1, w3, w2):
                y, stats = moe_forward(x, gate, w1, w3, w2, impl="ep_capacity", top_k=k, capacity_factor=cf)
                return jnp.sum(jnp.sin(y)), (y, stats.dropped_fraction)

            choices = oracle_choices(x, gate, k, cf, groups)

            def f_ref(x, gate, w1, w3, w2):
                y, d = moe_oracle(x, gate, w1, w3, w2, choices)
                return jnp.sum(jnp.sin(y)), (y, d)

            with jax.set_mesh(mesh):
                (_, (y, d)), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(
                    x, gate, w1, w3, w2)
            (_, (y0, d0)), g0 = jax.value_and_grad(f_ref, argnums=(0, 1, 2, 3, 4), has_aux=True)(
                x, gate, w1, w3, w2)
            print(json.dumps({"check": "moe_capacity", "mesh": mesh_str, "capacity_factor": cf,
                              "y_rel": rel(y, y0), "grad_rel": max(rel(a, b) for a, b in zip(g, g0)),
                              "dropped": float(d), "dropped_oracle": float(d0)}), flush=True)

        # the dropless ragged path, its collective emulated with a dense all_to_all (XLA:CPU has none)
        def fr(x, gate, w1, w3, w2):
            y, _ = moe_forward(x, gate, w1, w3, w2, impl="ep_ragged", top_k=k, a2a=ragged_all_to_all_emulated)
            return jnp.sum(jnp.sin(y)), y

        choices = oracle_choices(x, gate, k, -1.0, groups)

        def fr_ref(x, gate, w1, w3, w2):
            y, _ = moe_oracle(x, gate, w1, w3, w2, choices)
            return jnp.sum(jnp.sin(y)), y

        with jax.set_mesh(mesh):
            (_, y), g = jax.jit(jax.value_and_grad(fr, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, gate, w1, w3, w2)
        (_, y0), g0 = jax.value_and_grad(fr_ref, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, gate, w1, w3, w2)
        print(json.dumps({"check": "moe_ragged_emulated", "mesh": mesh_str, "y_rel": rel(y, y0),
                          "grad_rel": max(rel(a, b) for a, b in zip(g, g0))}), flush=True)


def check_lasp2():
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    B, Hh, T, D = 2, 4, 64, 8
    q = jax.random.normal(ks[0], (B, Hh, T, D)) * 0.5
    k = jax.random.normal(ks[1], (B, Hh, T, D)) * 0.5
    v = jax.random.normal(ks[2], (B, Hh, T, D))
    s0 = jax.random.normal(ks[3], (B, Hh, D, D))
    decay = jnp.array([0.05, 0.2, 0.9, 0.01])
    # documents: boundaries inside shards, exactly on a shard boundary (16, 32, 48), and one document
    # spanning several shards
    seg = jnp.array([[0] * 10 + [1] * 30 + [2] * 24, [0] * 16 + [1] * 16 + [2] * 32], jnp.int32)
    for mesh_str in ("context=4,fsdp=2", "context=2,tensor=2,fsdp=2"):
        mesh = make_mesh(MeshConfig.from_string(mesh_str))
        combos = [(None, None), (None, s0), (seg, None), (seg, s0)] if mesh_str.startswith("context=4") else [(seg, s0)]
        for segs, init in combos:
            if True:
                def run(fn, q, k, v, s):
                    o, st = fn(q, k, v, decay, initial_state=None if init is None else s, block_size=8,
                               backend="reference", segment_ids=segs)
                    return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(st)), (o, st)

                argn = (0, 1, 2) if init is None else (0, 1, 2, 3)
                (_, (o0, st0)), g0 = jax.value_and_grad(
                    lambda *a: run(pallas_kernels.lightning_attention, *a), argnums=argn, has_aux=True)(q, k, v, s0)
                with jax.set_mesh(mesh):
                    (_, (o1, st1)), g1 = jax.jit(jax.value_and_grad(
                        lambda *a: run(cp_lightning, *a), argnums=argn, has_aux=True))(q, k, v, s0)
                print(json.dumps({"check": "lasp2", "mesh": mesh_str, "segments": segs is not None,
                                  "initial_state": init is not None, "o_rel": rel(o1, o0),
                                  "state_rel": rel(st1, st0),
                                  "grad_rel": max(rel(a, b) for a, b in zip(g1, g0))}), flush=True)


def check_softmax_cp():
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    B, T, N, K, D = 2, 64, 4, 2, 8
    q = jax.random.normal(ks[0], (B, T, N, D))
    k = jax.random.normal(ks[1], (B, T, K, D))
    v = jax.random.normal(ks[2], (B, T, K, D))
    seg = jnp.array([[0] * 10 + [1] * 30 + [2] * 24, [0] * 16 + [1] * 16 + [2] * 32], jnp.int32)
    for mesh_str in ("context=4,fsdp=2", "context=2,tensor=4,fsdp=1"):
        mesh = make_mesh(MeshConfig.from_string(mesh_str))
        for segs in (None, seg):
            f0 = lambda q, k, v: jnp.sum(jnp.sin(causal_attention(q, k, v, segment_ids=segs)))  # noqa: E731
            f1 = lambda q, k, v: jnp.sum(jnp.sin(cp_attention(q, k, v, segment_ids=segs)))  # noqa: E731
            v0, g0 = jax.value_and_grad(f0, argnums=(0, 1, 2))(q, k, v)
            with jax.set_mesh(mesh):
                v1, g1 = jax.jit(jax.value_and_grad(f1, argnums=(0, 1, 2)))(q, k, v)
            print(json.dumps({"check": "softmax_cp", "mesh": mesh_str, "segments": segs is not None,
                              "loss_rel": rel(v1, v0), "grad_rel": max(rel(a, b) for a, b in zip(g1, g0))}),
                  flush=True)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    check_moe()
    check_lasp2()
    check_softmax_cp()
