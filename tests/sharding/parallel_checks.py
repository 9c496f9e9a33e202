"""Unit checks of the shard_map pieces on fake CPU devices (run as a script; prints one JSON line each).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding/parallel_checks.py

* expert parallel capacity dispatch vs a per-expert loop oracle (same capacity rule per source shard),
  with and without dropped tokens, outputs and gradients, plus the dropped fraction;
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
from m1_jax.model.moe import route
from m1_jax.model.softmax_attention import causal_attention
from sharding import MeshConfig, make_mesh
from sharding.context_parallel import causal_attention as cp_attention
from sharding.context_parallel import lightning_attention as cp_lightning
from sharding.moe_dispatch import capacity, moe_capacity, moe_ragged, ragged_all_to_all_emulated


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def moe_oracle(x, gate, w1, w3, w2, top_k, cf, groups):
    """Per-expert Python loop. Tokens are split into ``groups`` contiguous source shards (the batch
    sharding); each shard gives each expert C slots, filled by first choices then second choices,
    in token order. Returns (y, dropped_fraction)."""
    B, T, H = x.shape
    E = w1.shape[0]
    xg = x.reshape(groups, (B // groups) * T, H)
    ys, kept = [], 0
    for g in range(groups):
        xf = xg[g]
        N = xf.shape[0]
        w, e, _ = route(xf, gate, top_k)
        C = capacity(N, E, top_k, cf)
        used = np.zeros(E, int)
        keep = np.zeros((N, top_k), bool)
        e_np = np.asarray(e)
        for j in range(top_k):
            for n in range(N):
                if used[e_np[n, j]] < C:
                    keep[n, j] = True
                    used[e_np[n, j]] += 1
        kept += keep.sum()
        y = jnp.zeros((N, H), jnp.float32)
        for ex in range(E):
            h = jax.nn.silu(xf @ w1[ex]) * (xf @ w3[ex])
            out = h @ w2[ex]
            coef = jnp.sum(jnp.where((e == ex) & keep, w, 0.0), axis=1)
            y = y + coef[:, None] * out
        ys.append(y)
    return jnp.concatenate(ys).reshape(B, T, H), 1.0 - kept / (B * T * top_k)


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
                y, _, d = moe_capacity(x, gate, w1, w3, w2, route_fn=route, top_k=k, capacity_factor=cf)
                return jnp.sum(jnp.sin(y)), (y, d)

            def f_ref(x, gate, w1, w3, w2):
                y, d = moe_oracle(x, gate, w1, w3, w2, k, cf, groups)
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
            y, _, d = moe_ragged(x, gate, w1, w3, w2, route_fn=route, top_k=k, a2a=ragged_all_to_all_emulated)
            return jnp.sum(jnp.sin(y)), y

        def fr_ref(x, gate, w1, w3, w2):
            y, _ = moe_oracle(x, gate, w1, w3, w2, k, -1.0, groups)
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
