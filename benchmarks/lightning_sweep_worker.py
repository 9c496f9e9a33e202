"""The worker side of the lightning sweep (``lightning_sweep.py``): one process runs its share of the
tasks, compiling freely and taking a file lock for every timing, and writes one JSON line per task."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from lightning_sweep import INTERPRET, shape_bytes, task_cost  # noqa: E402


from lightning_bench import gpu_lock, time_call  # noqa: E402,F401  (shared with lightning_f32.py)


def replicas_for(nbytes, cap=16, fill=384 * 2 ** 20):
    """Independent input sets per timed call: small shapes run several in one executable so that the
    device, not the host's dispatch, is timed, and the inputs exceed the L2 cache."""
    cap = 2 if INTERPRET else cap
    return int(max(1, min(cap, math.ceil(fill / max(nbytes, 1)))))


def _inputs(B, H, T, D, seed, *, dtype_name="bfloat16", h0=True):
    """Random inputs drawn on the device (MiniMax-style slopes, q, k, v ~ 0.1 N(0, 1), h0 ~ 0.1 N(0, 1),
    dO and the final-state cotangent ~ N(0, 1))."""
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, HERE)
    import lightning_bench as la
    dt = getattr(jnp, dtype_name)
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    n = lambda key, shape, s=1.0: (s * jax.random.normal(key, shape, jnp.float32))  # noqa: E731
    x = dict(q=n(ks[0], (B, H, T, D), 0.1).astype(dt), k=n(ks[1], (B, H, T, D), 0.1).astype(dt),
             v=n(ks[2], (B, H, T, D), 0.1).astype(dt), do=n(ks[3], (B, H, T, D)).astype(dt),
             h0=n(ks[4], (B, H, D, D), 0.1) if h0 else None, dht=n(ks[5], (B, H, D, D)),
             decay=jnp.asarray(la.slopes(H)))
    return jax.block_until_ready(x)


def _ours(tuning):
    from pallas_kernels.lightning import op as lop

    def f(q, k, v, decay, h0):
        return lop.lightning_attention_kernel(q, k, v, decay, initial_state=h0, impl="mosaic_gpu",
                                              tuning=tuning or None, interpret=INTERPRET)
    return f


def _grad_fn(f, with_state):
    """Gradients and the loss value: the value needs the forward's outputs, so XLA keeps the forward kernel
    (with gradients alone it drops it: a linear attention's backward does not read o)."""
    import jax
    import jax.numpy as jnp

    def g(q, k, v, decay, h0, do, dht):
        def loss(q, k, v, h0):
            o, ht = f(q, k, v, decay, h0)
            val = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
            return val + jnp.sum(ht * dht) if with_state else val
        if with_state:
            val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, h0)
        else:
            val, grads = jax.value_and_grad(lambda q, k, v: loss(q, k, v, None), argnums=(0, 1, 2))(q, k, v)
        return grads + (val,)
    return g


def run_time(task, lock):
    """Our kernel at one point: forward and forward+backward (ms), over R replicated input sets."""
    import jax
    B, H, T, D = task["shape"]
    state = task["setting"] == "state"
    f = _ours(task.get("tuning"))
    R = replicas_for(shape_bytes(B, H, T, D, bwd=False, h0=state))
    xs = [_inputs(B, H, T, D, seed=i, h0=state) for i in range(R)]
    fa = [(x["q"], x["k"], x["v"], x["decay"], x["h0"]) for x in xs]
    ga = [a + (x["do"], x["dht"]) for a, x in zip(fa, xs)]
    g = _grad_fn(f, state)
    fwd = jax.jit(lambda a: [f(*z) for z in a])
    fb = jax.jit(lambda a: [g(*z) for z in a])
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(fa))
    jax.block_until_ready(fb(ga))
    compile_s = time.perf_counter() - t0
    with lock:  # the forward before and after the backward (clocks ramp up): the faster median counts
        tf, tf_all = time_call(fwd, (fa,))
        tb, tb_all = time_call(fb, (ga,))
        tf2, tf2_all = time_call(fwd, (fa,))
    return dict(fwd=min(tf, tf2) / R, fwdbwd=tb / R, replicas=R, compile_s=compile_s,
                fwd_runs=[t / R for t in tf_all + tf2_all], fwdbwd_runs=[t / R for t in tb_all])


def run_fla(task, lock):
    import torch
    sys.path.insert(0, HERE)
    import lightning_bench as la
    B, H, T, D = task["shape"]
    state = task["setting"] == "state"
    x = _inputs(B, H, T, D, seed=0, h0=state)
    la.fla_clear_autotune()
    fwd, fb = la.fla_callables(x, state, dht=la.to_torch(x["dht"]) if state else None)
    t0 = time.perf_counter()
    with lock:  # Triton's autotuning times candidates on the GPU: it must not overlap anyone's timing
        fwd()
        fb()
        torch.cuda.synchronize()
        tune_s = time.perf_counter() - t0
        tf, tb = (la.torch_time_ms(f, target_s=0.04, max_n=300, repeats=5) for f in (fwd, fb))
    return dict(fwd=tf, fwdbwd=tb, tune_s=tune_s)


def run_check(task, lock):
    """bf16 outputs, final state and all gradients of our kernel (random h0 and final-state cotangent,
    odd T) against the float32 recurrence (o, ht) and the float32 chunked reference's VJP (grads)."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.lightning import reference
    sys.path.insert(0, HERE)
    import lightning_bench as la
    B, H, T, D = task["shape"]
    x = _inputs(B, H, T, D, seed=7)
    x["decay"] = jnp.asarray(np.geomspace(0.9, 1e-5, H).astype(np.float32))
    f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
    ours = _ours(task.get("tuning"))
    ref = lambda q, k, v, d, h0: reference.lightning_attention_chunked(f32(q), f32(k), f32(v), d, h0, 64)  # noqa
    a = (x["q"], x["k"], x["v"], x["decay"], x["h0"])
    ga = a + (x["do"], x["dht"])
    rec = lambda q, k, v, d, h0: reference.lightning_attention_recurrent(f32(q), f32(k), f32(v), d, h0)  # noqa
    # compiled outside the lock, run under it: a check on the GPU must not overlap another worker's timing
    fns = [jax.jit(f).lower(*args).compile() for f, args in
           ((ours, a), (_grad_fn(ours, True), ga), (rec, a), (_grad_fn(ref, True), ga))]
    with lock:
        (o, h), go, (o_r, h_r), gr = jax.block_until_ready([f(*args) for f, args in zip(fns, (a, ga, a, ga))])
    errs = dict(zip(("o", "ht", "dq", "dk", "dv", "dh0"),
                    [la.rel(o, o_r), la.rel(h, h_r)] + [la.rel(u, w) for u, w in zip(go, gr)]))
    finite = all(bool(jnp.all(jnp.isfinite(z))) for z in (o, h, *go))
    return dict(errs=errs, ok=finite and max(errs.values()) < 2e-2)


def run_packed(task, lock):
    sys.path.insert(0, HERE)
    import lightning_bench as la
    with lock:  # compiles and runs in one piece: hold the GPU so no timing overlaps it
        return dict(ok=bool(la.check_mosaic_prefill_and_packed()))


def run_short(task, lock):
    """A prefill chunk of T tokens from a random state (forward only, the generation case)."""
    import jax
    B, H, T, D = task["shape"]
    f = _ours(task.get("tuning"))
    R = replicas_for(shape_bytes(B, H, T, D, bwd=False, h0=True))
    xs = [_inputs(B, H, T, D, seed=i) for i in range(R)]
    fa = [(x["q"], x["k"], x["v"], x["decay"], x["h0"]) for x in xs]
    fwd = jax.jit(lambda a: [f(*z) for z in a])
    jax.block_until_ready(fwd(fa))
    with lock:
        tf, _ = time_call(fwd, (fa,))
    return dict(fwd=tf / R, replicas=R)


def run_decode(task, lock):
    """``lightning_decode_step``: one token per row, the state donated and fed back (as generation does)."""
    import jax
    import jax.numpy as jnp
    import pallas_kernels
    B, H, D = task["shape"]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, H, D)).astype(np.float32) * 0.1, jnp.bfloat16) for _ in range(3))
    decay = jnp.asarray(np.geomspace(0.9, 1e-5, H).astype(np.float32))
    s = jnp.asarray(rng.standard_normal((B, H, D, D)).astype(np.float32))
    step = pallas_kernels.lightning_decode_step
    for _ in range(3):
        _, s = step(q, k, v, decay, s)
    jax.block_until_ready(s)
    with lock:
        res = []
        for _ in range(5):
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                o, s = step(q, k, v, decay, s)
            jax.block_until_ready(s)
            res.append((time.perf_counter() - t0) / n * 1e3)
    return dict(fwd=float(np.median(res)))


def measure_bandwidth(nbytes=2 * 2 ** 30):
    """Device-to-device copy bandwidth (bytes read + written per second), the best of: XLA negating a
    ``nbytes`` array of bf16 and of float32 (each byte read and written once), and a PyTorch
    ``copy_`` between two such buffers when PyTorch is installed. The GPU is kept busy for a moment
    first so that its clocks are up."""
    import jax
    import jax.numpy as jnp
    res = {}
    for name, dt in (("xla_neg_f32", jnp.float32), ("xla_neg_bf16", jnp.bfloat16)):
        x = jax.random.normal(jax.random.PRNGKey(0), (nbytes // jnp.dtype(dt).itemsize,), dt)
        f = jax.jit(lambda x: -x)
        for _ in range(20):
            jax.block_until_ready(f(x))
        ms, _ = time_call(f, (x,), target_s=0.05)
        res[name] = 2 * nbytes / (ms * 1e-3)
        del x
    try:
        import torch
        a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
        b = torch.empty_like(a)
        for _ in range(10):
            b.copy_(a)
        torch.cuda.synchronize()
        runs = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(20):
                b.copy_(a)
            e.record()
            torch.cuda.synchronize()
            runs.append(s.elapsed_time(e) / 20)
        res["torch_copy"] = 2 * nbytes / (float(np.median(runs)) * 1e-3)
        del a, b
        torch.cuda.empty_cache()
    except Exception as e:  # no PyTorch or no CUDA there
        res["torch_copy_error"] = repr(e)[:200]
    best = max(v for v in res.values() if isinstance(v, float))
    return dict(bytes_per_s=best, nbytes=nbytes, each=res)


def run_bandwidth(task, lock):
    with lock:
        return measure_bandwidth(2 ** 24 if os.environ.get("LIGHTNING_SWEEP_TINY") else 2 * 2 ** 30)


RUNNERS = dict(bandwidth=run_bandwidth, time=run_time, fla=run_fla, check=run_check, packed=run_packed, short=run_short, decode=run_decode)


def worker_main(tasks_path, out_path, lock_path, deadline):
    """Runs the tasks of one worker, one JSON line each (errors and skips recorded, never fatal)."""
    tasks = json.load(open(tasks_path))
    with open(out_path, "a") as out:
        for t in tasks:
            rec = dict(t)
            left = deadline - time.time()
            if left < 8 + 2 * task_cost(t):
                rec["skipped"] = f"deadline ({left:.0f} s left)"
            else:
                t0 = time.perf_counter()
                try:
                    rec.update(RUNNERS[t["kind"]](t, gpu_lock(lock_path)))
                except Exception as e:  # report and go on
                    rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                rec["task_s"] = time.perf_counter() - t0
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(("SKIP " if "skipped" in rec else "ERR " if "error" in rec else "") +
                  json.dumps({k: rec[k] for k in rec if k != "tuning" and not k.endswith("_runs")})[:600], flush=True)
