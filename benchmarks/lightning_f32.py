"""float32 inputs on the GPU: compile and run time of each candidate path, its accuracy against a
float64 NumPy recurrence, and its speed against the XLA reference.

    python benchmarks/lightning_f32.py --config auto --out f32.jsonl     # one candidate per process

Each stage (lower, compile, first run) is written as it ends, so a candidate that hangs shows where.
``lightning_attention.py --mode sweep --f32`` runs every candidate in its own process with a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

SHAPE = (1, 4, 520, 128)  # the shape that did not return within 75-100 s on the H200
SPEED_SHAPES = [(2, 8, 4096, 128), (1, 8, 32768, 128), (4, 16, 4096, 128)]
if os.environ.get("LIGHTNING_SWEEP_TINY"):  # dry runs on the CPU
    SHAPE, SPEED_SHAPES = (1, 2, 40, 16), [(1, 2, 70, 16)]

# name -> (how to call): "auto" and "reference" are the public op's backends; the rest name a kernel
# and its tuning.
CONFIGS = {
    "auto": dict(backend="pallas_gpu"),
    "reference": dict(backend="reference"),
    "chunked_c64": dict(impl="triton_chunked", block_size=64),
    "fused_ieee": dict(impl="triton_fused"),
    "fused_ieee_c32": dict(impl="triton_fused", block_size=32, tuning=dict(fwd_BV=32, bwd_BK=32, bwd_BV=32)),
    "fused_tf32x3": dict(impl="triton_fused", tuning=dict(f32_precision="tf32x3")),
    "chunked_tf32x3": dict(impl="triton_chunked", tuning=dict(f32_precision="tf32x3")),
}


def recurrence_f64(q, k, v, decay, h0, do, dht):
    """o, final state and the gradients of <o, do> + <ht, dht> w.r.t. q, k, v, h0, by the token recurrence
    in float64 (forward, then its adjoint backwards in time)."""
    q, k, v, h0, do, dht = (np.asarray(a, np.float64) for a in (q, k, v, h0, do, dht))
    g = np.exp(-np.asarray(decay, np.float64))[None, :, None, None]
    B, H, T, _ = q.shape
    S = h0.copy()
    states, o = [], np.zeros_like(v)
    for t in range(T):
        S = g * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        states.append(S)
        o[:, :, t] = np.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    G = dht.copy()  # cotangent of S_t, accumulated from the right
    for t in range(T - 1, -1, -1):
        G = G + q[:, :, t, :, None] * do[:, :, t, None, :]
        dq[:, :, t] = np.einsum("bhkv,bhv->bhk", states[t], do[:, :, t])
        dk[:, :, t] = np.einsum("bhkv,bhv->bhk", G, v[:, :, t])
        dv[:, :, t] = np.einsum("bhkv,bhk->bhv", G, k[:, :, t])
        G = g * G
    return o, S, dq, dk, dv, G


def make_fn(cfg):
    from pallas_kernels.lightning import op as lop
    interpret = bool(os.environ.get("LIGHTNING_BENCH_INTERPRET"))  # dry runs on the CPU

    def f(q, k, v, decay, h0):
        if "backend" in cfg:
            return lop.lightning_attention(q, k, v, decay, initial_state=h0, backend=cfg["backend"],
                                           interpret=interpret)
        return lop.lightning_attention_kernel(q, k, v, decay, initial_state=h0, impl=cfg["impl"],
                                              block_size=cfg.get("block_size"), tuning=cfg.get("tuning"),
                                              interpret=interpret)
    return f


def grads_fn(f):
    import jax
    import jax.numpy as jnp

    def g(q, k, v, decay, h0, do, dht):
        def loss(q, k, v, h0):
            o, ht = f(q, k, v, decay, h0)
            return jnp.sum(o * do) + jnp.sum(ht * dht)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, h0)
    return g


def inputs(B, H, T, D, seed=0):
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(q=jnp.asarray(0.3 * n(B, H, T, D)), k=jnp.asarray(0.3 * n(B, H, T, D)), v=jnp.asarray(n(B, H, T, D)),
                decay=jnp.asarray(np.geomspace(0.9, 1e-4, H).astype(np.float32)), h0=jnp.asarray(n(B, H, D, D)),
                do=jnp.asarray(n(B, H, T, D)), dht=jnp.asarray(n(B, H, D, D)))


def staged(fn, args, emit, label):
    """lower / compile / first run, each timed and written as it ends; returns (compiled, outputs)."""
    import jax
    t0 = time.perf_counter()
    low = jax.jit(fn).lower(*args)
    emit(dict(stage=f"{label}.lower", s=time.perf_counter() - t0))
    t0 = time.perf_counter()
    comp = low.compile()
    emit(dict(stage=f"{label}.compile", s=time.perf_counter() - t0))
    t0 = time.perf_counter()
    out = jax.block_until_ready(comp(*args))
    emit(dict(stage=f"{label}.first_run", s=time.perf_counter() - t0))
    return comp, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, choices=sorted(CONFIGS))
    p.add_argument("--out", required=True)
    p.add_argument("--lock", default="")
    p.add_argument("--speed", action="store_true", help="also time at SPEED_SHAPES when it compiles fast")
    args = p.parse_args()
    import jax
    import lightning_bench as sw
    cfg = CONFIGS[args.config]
    out = open(args.out, "a")

    def emit(rec):
        rec = dict(config=args.config, **rec)
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print(json.dumps(rec), flush=True)

    from pallas_kernels.lightning import op as lop
    if "impl" not in cfg and cfg["backend"] == "pallas_gpu":
        emit(dict(stage="dispatch", kernel=str(lop.choose_kernel("pallas_gpu", SHAPE, SHAPE[-1], "float32"))))
    x = inputs(*SHAPE)
    f, g = make_fn(cfg), None
    g = grads_fn(f)
    fa = (x["q"], x["k"], x["v"], x["decay"], x["h0"])
    ga = fa + (x["do"], x["dht"])
    t_start = time.perf_counter()
    cf, (o, ht) = staged(f, fa, emit, "fwd")
    cg, grads = staged(g, ga, emit, "fwdbwd")
    ref = recurrence_f64(*(np.asarray(a) for a in (x["q"], x["k"], x["v"], x["decay"], x["h0"], x["do"], x["dht"])))
    got = [o, ht] + list(grads)
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))  # noqa: E731
    emit(dict(stage="accuracy", shape=list(SHAPE), errs=dict(zip(("o", "ht", "dq", "dk", "dv", "dh0"),
                                                                  [rel(a, b) for a, b in zip(got, ref)]))))
    with sw.gpu_lock(args.lock):
        emit(dict(stage="time", shape=list(SHAPE), fwd=sw.time_call(cf, fa)[0], fwdbwd=sw.time_call(cg, ga)[0]))
    if args.speed and time.perf_counter() - t_start < 90:
        for shp in SPEED_SHAPES:
            x = inputs(*shp)
            fa = (x["q"], x["k"], x["v"], x["decay"], x["h0"])
            ga = fa + (x["do"], x["dht"])
            jf, jg = jax.jit(f), jax.jit(g)
            jax.block_until_ready(jf(*fa))
            jax.block_until_ready(jg(*ga))
            with sw.gpu_lock(args.lock):
                emit(dict(stage="time", shape=list(shp), fwd=sw.time_call(jf, fa)[0], fwdbwd=sw.time_call(jg, ga)[0]))
    emit(dict(stage="done"))


if __name__ == "__main__":
    main()
