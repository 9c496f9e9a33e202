"""The lightning-attention benchmark's library: inputs, timing, the implementations under test (ours, the
XLA reference, fla, cuDNN softmax), correctness checks, tuning, the bench table and its plot, and the
GPU lock and timer the sweep's worker processes share. The command line is ``lightning_attention.py``;
the sweep is ``lightning_sweep.py`` (its workers ``lightning_sweep_worker.py``, the float32 candidates
``lightning_f32.py``); all of them import from here, never from each other upwards."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.lightning import op as lop  # noqa: E402
from pallas_kernels.lightning import reference  # noqa: E402

INTERPRET = bool(os.environ.get("LIGHTNING_BENCH_INTERPRET"))  # dry runs on CPU
SHAPES = [(4, 16, 4096, 128), (1, 8, 32768, 128), (1, 64, 8192, 128), (8, 16, 2048, 128), (1, 8, 131072, 128)]


def slopes(H, layer=40, L=80):
    s = np.array([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], np.float64)
    return (s * (1 - layer / (L - 1) + 1e-5)).astype(np.float32)


def inputs(B, H, T, D, seed=0, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, T, D), np.float32) * 0.1 for _ in range(3))
    h0 = rng.standard_normal((B, H, D, D), np.float32) * 0.1
    do = rng.standard_normal((B, H, T, D), np.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), decay=jnp.asarray(slopes(H)), h0=jnp.asarray(h0), do=cast(do))


def time_jax(fn, args, *, min_time=0.3, max_iters=200):
    for _ in range(2):  # compile, then one more warm-up call
        out = fn(*args)
        jax.block_until_ready(out)
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    one = time.perf_counter() - t0
    n = int(max(3, min(max_iters, min_time / max(one, 1e-6))))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(n):  # back-to-back, one sync at the end
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e3


def lin_flops(B, H, T, D, C=64):
    return B * H * T * (2 * C * (D + D) + 4 * D * D)


def sdpa_flops(B, H, T, D):
    return 2 * B * H * T * T * D  # causal: half of 4 B H T^2 D


# ---------------------------------------------------------------------------------------------
# JAX candidates
# ---------------------------------------------------------------------------------------------

def ours_fns(impl, block_size=None, tuning=None):
    def f(q, k, v, decay, h0):
        return lop.lightning_attention_kernel(q, k, v, decay, initial_state=h0, impl=impl, block_size=block_size,
                                              tuning=tuning, interpret=INTERPRET)
    return f


def auto_fn(q, k, v, decay, h0):
    return lop.lightning_attention(q, k, v, decay, initial_state=h0, backend="pallas_gpu")


def ref_fn(q, k, v, decay, h0):
    return reference.lightning_attention_chunked(q, k, v, decay, h0, 256)


def fwd_bwd(f, state=True):
    """Gradients of <o, dO> + sum(final state) w.r.t. q, k, v, h0 (``state``: the setting with an initial
    state and a final-state cotangent), or of <o, dO> w.r.t. q, k, v without an initial state (training); with
    the loss value, which keeps the forward kernel in the program (gradients alone do not read o, and XLA
    drops the kernel that computes it)."""
    def g(q, k, v, decay, h0, do):
        def loss(q, k, v, h0):
            o, ht = f(q, k, v, decay, h0)
            val = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
            return val + jnp.sum(ht) if state else val
        if state:
            val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, h0)
        else:
            val, grads = jax.value_and_grad(lambda q, k, v: loss(q, k, v, None), argnums=(0, 1, 2))(q, k, v)
        return grads + (val,)
    return g


def time_pair(f, x, *, bwd=True, state=True):
    fw = jax.jit(f)
    a = (x["q"], x["k"], x["v"], x["decay"], x["h0"] if state else None)
    t_f = time_jax(fw, a)
    t_b = time_jax(jax.jit(fwd_bwd(f, state)), a + (x["do"],)) if bwd else float("nan")
    return t_f, t_b


def cudnn_pair(x, bwd=True):
    def f(q, k, v):
        t = lambda z: jnp.swapaxes(z, 1, 2)  # [B, T, H, D]
        return jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True, implementation="cudnn")

    def g(q, k, v, do):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * jnp.swapaxes(do, 1, 2)),
                        argnums=(0, 1, 2))(q, k, v)
    a = (x["q"], x["k"], x["v"])
    t_f = time_jax(jax.jit(f), a)
    t_b = time_jax(jax.jit(g), a + (x["do"],)) if bwd else float("nan")
    return t_f, t_b


# ---------------------------------------------------------------------------------------------
# fla (PyTorch + Triton)
# ---------------------------------------------------------------------------------------------

def fla_available():
    try:
        import torch  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
        return True
    except Exception as e:  # pragma: no cover
        print(f"fla not available: {e!r}")
        return False


def fla_clear_autotune():
    import triton
    n = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("fla"):
            continue
        for obj in list(vars(mod).values()):
            tuner = obj
            while tuner is not None and not isinstance(tuner, triton.runtime.autotuner.Autotuner):
                tuner = getattr(tuner, "fn", None) if not isinstance(tuner, type) else None
            if tuner is not None and hasattr(tuner, "cache"):
                tuner.cache.clear()
                n += 1
    return n


def to_torch(x, dtype=None):
    import torch
    t = torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).cuda()
    return t.to(dtype) if dtype is not None else t


def fla_callables(x, state, dht=None):
    """fla's ``chunk_simple_gla`` on the inputs of ``x`` (``[B, H, T, D]`` arrays; bf16 ``[B, T, H, D]`` in
    torch): ``fwd()`` and ``fb()`` (forward + backward with ``dO``; with ``state`` also the initial state and
    the final-state cotangent ``dht``, default ones)."""
    import torch
    from fla.ops.simple_gla import chunk_simple_gla
    bf = torch.bfloat16
    tr = lambda z: to_torch(z, bf).transpose(1, 2).contiguous()  # noqa: E731  [B, T, H, D]
    q, k, v, do = tr(x["q"]), tr(x["k"]), tr(x["v"]), tr(x["do"])
    g = -to_torch(x["decay"])
    h0 = to_torch(x["h0"]) if state else None
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    h0g = h0.clone().requires_grad_(True) if state else None

    def fwd():
        return chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0, initial_state=h0, output_final_state=state)

    def fb():
        o, ht = chunk_simple_gla(qg, kg, vg, g_gamma=g, scale=1.0, initial_state=h0g, output_final_state=state)
        if state:
            torch.autograd.backward((o, ht), (do, torch.ones_like(ht) if dht is None else dht))
        else:
            torch.autograd.backward(o, do)

    return fwd, fb


def torch_time_ms(fn, *, target_s, max_n, repeats=1):
    """Median over ``repeats`` of back-to-back loops of ``fn`` lasting about ``target_s`` (CUDA events, ms
    per call); ``fn`` is run once first."""
    import torch
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = int(max(3, min(max_n, target_s / max(time.perf_counter() - t0, 1e-6))))
    res = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        torch.cuda.synchronize()
        res.append(s.elapsed_time(e) / n)
    return float(np.median(res))


def fla_run(x, state=True):
    """Returns (o [B,H,T,D] float32 numpy, ht or None, t_fwd ms, t_fwdbwd ms); ``state``: with the initial
    state and a final-state cotangent of ones, else neither (training)."""
    fla_clear_autotune()
    fwd, fb = fla_callables(x, state)
    o, ht = fwd()
    t_f = torch_time_ms(fwd, target_s=0.3, max_n=200)
    t_b = torch_time_ms(fb, target_s=0.3, max_n=200)
    o_np = o.float().transpose(1, 2).cpu().numpy()
    return o_np, (ht.float().cpu().numpy() if state else None), t_f, t_b


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------

IMPLS = ["triton_fused", "triton_chunked", "mosaic_gpu"]


def available_impls():
    out = []
    for impl in IMPLS:
        if impl == "mosaic_gpu":
            try:
                from pallas_kernels.lightning import gpu_mosaic  # noqa: F401
            except Exception as e:
                print(f"mosaic_gpu impl not importable: {e!r}")
                continue
        out.append(impl)
    return out


def check(impls):
    """Compiled GPU correctness against the scan recurrence: outputs and all gradients."""
    print("== GPU correctness (relative error vs lax.scan recurrence, float32 math) ==")
    ok = True
    for dtype, tol in ((jnp.float32, 2e-4), (jnp.bfloat16, 2e-2)):
        for (B, H, T, D) in ((2, 3, 200, 64), (1, 2, 300, 128)):
            x = inputs(B, H, T, D, seed=1, dtype=dtype)
            x["decay"] = jnp.asarray(np.geomspace(0.9, 1e-5, H).astype(np.float32))
            f32 = lambda z: z.astype(jnp.float32)
            rf = lambda q, k, v, d, h0: reference.lightning_attention_recurrent(f32(q), f32(k), f32(v), d, h0)
            dht = jnp.asarray(np.random.default_rng(3).standard_normal((B, H, D, D)).astype(np.float32))

            def grads(f):
                def loss(q, k, v, h0):
                    o, ht = f(q, k, v, x["decay"], h0)
                    return jnp.sum(o.astype(jnp.float32) * x["do"].astype(jnp.float32)) + jnp.sum(ht * dht)
                return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x["q"], x["k"], x["v"], x["h0"])
            a = (x["q"], x["k"], x["v"], x["decay"], x["h0"])
            o_r, h_r = jax.jit(rf)(*a)
            g_r = grads(rf)
            for impl in impls:
                for C in ((64,) if impl == "mosaic_gpu" else (16, 64) if T < 256 else (64,)):
                    try:
                        f = ours_fns(impl, block_size=C)
                        o, h = jax.jit(f)(*a)
                        g = grads(f)
                        errs = [rel(o, o_r), rel(h, h_r)] + [rel(u, w) for u, w in zip(g, g_r)]
                        good = max(errs) < tol
                        ok &= good
                        print(f"{'ok ' if good else 'BAD'} {impl:15s} {jnp.dtype(dtype).name:8s} C={C:3d} "
                              f"{(B, H, T, D)} o/ht/dq/dk/dv/dh0 " + " ".join(f"{e:.1e}" for e in errs))
                    except Exception as e:  # report and go on: one broken impl must not hide the rest
                        ok = False
                        print(f"ERR {impl} {jnp.dtype(dtype).name} C={C}: {type(e).__name__}: {str(e)[:400]}")
    if "mosaic_gpu" in impls:
        ok &= check_mosaic_prefill_and_packed()
    return ok


def check_mosaic_prefill_and_packed():
    """The Mosaic kernel split into segments (the prefill form), then on packed rows (segment_ids, starts
    inside chunks and at a chunk edge): bf16 outputs and all gradients against float32 references."""
    x = inputs(1, 2, 64 * 37 + 11, 128, seed=2)
    x["decay"] = jnp.asarray(np.array([0.5, 1e-4], np.float32))
    a = (x["q"], x["k"], x["v"], x["decay"], x["h0"])
    f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
    dht = jnp.asarray(np.random.default_rng(4).standard_normal((1, 2, 128, 128)).astype(np.float32))
    seg = np.zeros((1, x["q"].shape[2]), np.int32)
    for start in (5, 6, 640, 1000, 1700):
        seg[:, start:] += 1
    seg = jnp.asarray(seg)

    def grads(f):
        def loss(q, k, v, h0):
            o, ht = f(q, k, v, x["decay"], h0)
            return jnp.sum(o.astype(jnp.float32) * x["do"].astype(jnp.float32)) + jnp.sum(ht * dht)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x["q"], x["k"], x["v"], x["h0"])

    def ref(segment_ids):
        return lambda q, k, v, d, h0: reference.lightning_attention_chunked(f32(q), f32(k), f32(v), d, h0, 64,
                                                                            segment_ids=segment_ids)

    def ours(P, segment_ids):
        return lambda q, k, v, d, h0: lop.lightning_attention_kernel(
            q, k, v, d, initial_state=h0, impl="mosaic_gpu", tuning={"segments": P}, segment_ids=segment_ids,
            interpret=INTERPRET)

    ok = True
    for label, segment_ids, counts in (("", None, (2, 8)), ("packed rows, ", seg, (1, 8))):
        o_r, h_r = ref(segment_ids)(*a)
        g_r = grads(ref(segment_ids))
        for P in counts:
            try:
                f = ours(P, segment_ids)
                o, h = jax.jit(f)(*a)
                errs = [rel(o, o_r), rel(h, h_r)] + [rel(u, w) for u, w in zip(grads(f), g_r)]
                good = max(errs) < 2e-2
                ok &= good
                print(f"{'ok ' if good else 'BAD'} mosaic_gpu {label}segments={P} {tuple(x['q'].shape)} "
                      "o/ht/dq/dk/dv/dh0 " + " ".join(f"{e:.1e}" for e in errs))
            except Exception as e:  # report and go on
                ok = False
                print(f"ERR mosaic_gpu {label}segments={P}: {type(e).__name__}: {str(e)[:400]}")
    return ok


def tune(impls, shapes):
    configs = {
        "triton_fused": [dict(block_size=c, tuning=dict(fwd_BV=bv, fwd_num_warps=w, bwd_BK=bv, bwd_BV=bv,
                                                           bwd_num_warps=w))
                         for c in (64, 128) for bv in (32, 64) for w in (4, 8)],
        # the shipped two-stage setting, then the segment-fused prefill forward (fwd_mode="fused")
        "triton_chunked": [dict(block_size=128, tuning=dict(lop.GPU_CHUNKED["tuning"]))] +
                          [dict(block_size=128, tuning={**dict(lop.GPU_CHUNKED["tuning"]), "fwd_mode": "fused",
                                                        "fwd_L": seg, "fwd_BV_fused": bvf})
                           for seg in (8, 16, 32) for bvf in (32, 64)],
        "mosaic_gpu": [dict(block_size=64, tuning=dict(target_programs=t, steps=st))
                       for t, st in ((128, 2), (128, 3), (256, 2), (256, 3), (512, 3))],
    }
    res = []
    for shp in shapes:
        x = inputs(*shp)
        for impl in impls:
            for cfg in configs.get(impl, [dict()]):
                try:
                    tf, tb = time_pair(ours_fns(impl, **cfg), x)
                except Exception as e:
                    print(f"{shp} {impl} {cfg}: ERR {type(e).__name__}: {str(e)[:300]}")
                    continue
                print(f"{str(shp):22s} {impl:15s} {json.dumps(cfg):120s} fwd {tf:7.3f} fwd+bwd {tb:7.3f}", flush=True)
                res.append(dict(shape=shp, impl=impl, cfg=cfg, fwd=tf, fwdbwd=tb))
    return res


def bench(impls, shapes, out_dir, with_fla=True, with_cudnn=True, settings=("state", "train")):
    """Times ``auto`` (the shipped choice) and each impl in ``impls``; fla and cuDNN in the same run. Each
    shape in each setting: "state" (a random initial state given, a final-state cotangent of ones) and
    "train" (neither: the training case)."""
    rows = []
    have_fla = with_fla and fla_available()
    for shp in shapes:
        B, H, T, D = shp
        x = inputs(*shp)
        a = (x["q"], x["k"], x["v"], x["decay"], x["h0"])
        o_auto, h_auto = jax.jit(auto_fn)(*a)
        o_ref, h_ref = jax.jit(ref_fn)(*a)
        for setting in settings:
            state = setting == "state"
            row = dict(shape=list(shp), setting=setting)
            row["auto_impl"] = lop.choose_kernel("pallas_gpu", x["q"].shape, D, x["q"].dtype).impl
            row["err_vs_ref"] = [rel(o_auto.astype(jnp.float32), o_ref.astype(jnp.float32)), rel(h_auto, h_ref)]
            row["impl_err_vs_ref"], row["ours"] = {}, {}
            for impl in impls:  # every timed kernel computes the same function
                f = ours_fns(impl)  # one function object: the timing reuses the check's compilation
                try:
                    o_i, h_i = jax.jit(f)(*a)
                    row["impl_err_vs_ref"][impl] = [rel(o_i.astype(jnp.float32), o_ref.astype(jnp.float32)),
                                                    rel(h_i, h_ref)]
                    row["ours"][impl] = time_pair(f, x, state=state)
                except Exception as e:
                    print(f"{shp} {impl}: ERR {type(e).__name__}: {str(e)[:300]}")
            # the shipped choice: reuse its timing when it was just measured explicitly
            row["auto"] = row["ours"].get(row["auto_impl"]) or time_pair(auto_fn, x, state=state)
            row["xla_ref"] = time_pair(ref_fn, x, state=state)
            if with_cudnn and setting == settings[0]:
                try:
                    row["cudnn"] = cudnn_pair(x)
                except Exception as e:
                    print(f"{shp} cudnn: ERR {type(e).__name__}: {str(e)[:300]}")
            if have_fla:
                o_f, h_f, tf, tb = fla_run(x, state=state)
                row["fla"] = (tf, tb)
                if state:
                    row["err_vs_fla"] = [rel(np.asarray(o_auto, np.float32), o_f), rel(h_auto, h_f)]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows):
    lines = []
    hdr = ("| B,H,T,D | setting | ours (auto) fwd / fwd+bwd ms | TFLOP/s | fla fwd / fwd+bwd ms | ratio fla/ours | "
           "XLA ref fwd / fwd+bwd | cuDNN softmax fwd / fwd+bwd | other impls fwd / fwd+bwd |")
    lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        B, H, T, D = r["shape"]
        af, ab = r["auto"]
        fl = lin_flops(B, H, T, D)
        tfl = f"{fl / af / 1e9:.0f} / {3 * fl / ab / 1e9:.0f}"
        fla = r.get("fla")
        fla_s = f"{fla[0]:.3f} / {fla[1]:.3f}" if fla else "-"
        ratio = f"{fla[0] / af:.2f}x / {fla[1] / ab:.2f}x" if fla else "-"
        cu = r.get("cudnn")
        cu_s = f"{cu[0]:.3f} / {cu[1]:.3f}" if cu else "-"
        oth = "; ".join(f"{k}: {v[0]:.3f} / {v[1]:.3f}" for k, v in r["ours"].items())
        lines.append(f"| {B},{H},{T},{D} | {r.get('setting', 'state')} | {af:.3f} / {ab:.3f} ({r['auto_impl']}) | "
                     f"{tfl} | {fla_s} | {ratio} | {r['xla_ref'][0]:.3f} / {r['xla_ref'][1]:.3f} | {cu_s} | {oth} |")
    return "\n".join(lines)


def best_triton(row):
    """The faster Triton-lowered kernel at this shape (by forward+backward time), or None."""
    cands = [v for k, v in row.get("ours", {}).items() if k.startswith("triton")]
    return min(cands, key=lambda v: v[1]) if cands else None


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [",".join(map(str, r["shape"])) + (" train" if r.get("setting") == "train" else "") for r in rows]
    series = {f"ours ({', '.join(sorted({r['auto_impl'] for r in rows}))})": [r["auto"] for r in rows]}
    triton = [best_triton(r) for r in rows]
    if any(t is not None for t in triton):
        series["ours, best Triton kernel"] = [t or (np.nan, np.nan) for t in triton]
    series.update({"fla chunk_simple_gla": [r.get("fla", (np.nan,) * 2) for r in rows],
                   "XLA reference": [r["xla_ref"] for r in rows],
                   "cuDNN softmax": [r.get("cudnn", (np.nan,) * 2) for r in rows]})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    w = 0.8 / len(series)
    for ax, idx, title in ((axes[0], 0, "forward"), (axes[1], 1, "forward + backward")):
        for j, (name, vals) in enumerate(series.items()):
            ax.bar(np.arange(len(rows)) + (j - (len(series) - 1) / 2) * w, [v[idx] for v in vals], w, label=name)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(rows)))
        ax.set_xticklabels(labels, rotation=20, fontsize=8)
        ax.set_ylabel("ms (log)")
        ax.set_title(f"lightning attention {title}, bf16, (B,H,T,D)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@contextlib.contextmanager
def gpu_lock(path):
    """Only one process times at a time (compiles run in parallel outside the lock)."""
    if not path:
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_call(fn, args, *, target_s=0.03, repeats=5):
    """Median over ``repeats`` of back-to-back loops of about ``target_s`` (ms per call); ``fn`` is
    already compiled and warm."""
    import jax
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    n = int(max(2, min(500, target_s / max(one, 1e-6))))
    res = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        res.append((time.perf_counter() - t0) / n * 1e3)
    return float(np.median(res)), [float(r) for r in res]
