"""Grouped GEMM at MoE shapes: our kernels beside ``lax.ragged_dot`` and a dense matmul of the same useful FLOPs.

    python benchmarks/moe.py --out results/            # the issue's four shapes, every backend that runs here
    python benchmarks/moe.py --mode check              # GPU correctness only (values, both gradients)
    python benchmarks/moe.py --mode sweep              # tile sweep of the Mosaic kernels at the presets' shapes
    python benchmarks/moe.py --mode all --out results/ # check, bench, sweep

Shapes are ``rows x K x N``: ``rows`` (token, expert) pairs through ``[K, N]`` expert matrices, 32
experts, random balanced routing (each row's expert uniform at random), bf16, float32 accumulation.
FLOPs are the useful ones, ``2 rows K N`` forward and 3x that forward + backward (input and weight
gradients), for every backend; the dense baseline is one ``[rows, K] @ [K, N]`` matmul. ``check``
compares every backend with a float64 NumPy loop over the groups on uneven groups (empty ones
included, and rows past the groups), forward, input gradient and weight gradient, bf16 and float32.
Writes ``moe.json`` and ``moe.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.moe import gmm, grouped_matmul, resolve_backend  # noqa: E402

SHAPES = [(16384, 1024, 384), (16384, 384, 1024), (16384, 2048, 3072), (65536, 2048, 3072)]
EXPERTS = 32
BF16 = jnp.bfloat16


def balanced_sizes(rows: int, experts: int, seed: int = 0) -> np.ndarray:
    """Random balanced routing: each row's expert uniform at random."""
    return np.bincount(np.random.default_rng(seed).integers(0, experts, rows), minlength=experts).astype(np.int32)


def time_call(fn, *args, reps: int = 7, min_time: float = 0.05) -> float:
    """Median seconds per call: warm-up, then ``reps`` timings of ``n`` back-to-back calls."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, min(100, int(min_time / one)))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / n)
    return float(np.median(ts))


def _data(rows, K, N, experts, dtype=BF16, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (rows, K), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (experts, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    ct = jax.random.normal(k[2], (rows, N), jnp.float32).astype(dtype)
    return x, w, ct


def bench_shape(rows, K, N, backend, experts=EXPERTS):
    """(forward s, forward + backward s) of one backend at one shape."""
    x, w, ct = _data(rows, K, N, experts)
    sizes = jnp.asarray(balanced_sizes(rows, experts))
    # value_and_grad: the loss value keeps the forward product alive (with a loss linear in the output
    # and only its gradient returned, XLA drops the forward and times the backward alone)
    if backend == "dense":
        w0 = w[0]
        fwd = jax.jit(lambda x, w: x @ w)
        both = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32) * ct), argnums=(0, 1)))
        return time_call(fwd, x, w0), time_call(both, x, w0)
    fwd = jax.jit(lambda x, w: gmm(x, w, sizes, backend=backend))
    both = jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, backend=backend).astype(jnp.float32) * ct), argnums=(0, 1)))
    return time_call(fwd, x, w), time_call(both, x, w)


def _loop64(x, w, sizes, ct):
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    out, dx, dw, s = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w), 0
    for g, n in enumerate(sizes):
        r = slice(s, s + n)
        out[r], dx[r], dw[g] = x[r] @ w[g], ct[r] @ w[g].T, x[r].T @ ct[r]
        s += n
    return out, dx, dw


def check(backends, log):
    """Values and both gradients of grouped_matmul vs a float64 loop over groups, bf16 and float32."""
    rows, K, N, E = 4000, 256, 512, 8
    sizes = np.array([700, 0, 1, 1300, 0, 999, 500, 0], np.int32)  # empty groups, a 1-row group, 500 rows past
    results = []
    for dtype in (BF16, jnp.float32):
        x, w, ct = _data(rows, K, N, E, dtype, seed=1)
        ref = _loop64(x, w, sizes, ct)
        for b in backends:
            if b == "mosaic_gpu" and dtype == jnp.float32:
                continue  # wgmma would round float32 to tf32: float32 goes to the other backends
            try:
                f = jax.jit(jax.value_and_grad(
                    lambda x, w: (jnp.sum(grouped_matmul(x, w, jnp.asarray(sizes), backend=b).astype(jnp.float32)
                                          * ct.astype(jnp.float32))), argnums=(0, 1)))
                out = jax.jit(lambda x, w: gmm(x, w, jnp.asarray(sizes), backend=b))(x, w)
                _, (dx, dw) = f(x, w)
                errs = {}
                for name, a, r in (("out", out, ref[0]), ("dx", dx, ref[1]), ("dw", dw, ref[2])):
                    a = np.asarray(a, np.float64)
                    errs[name] = float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))
                past = float(np.max(np.abs(np.asarray(out, np.float64)[sizes.sum():]))) if sizes.sum() < rows else 0.0
                empty_dw = float(np.max(np.abs(np.asarray(dw, np.float64)[sizes == 0])))
                tol = 2e-2 if dtype == BF16 else 1e-4
                ok = all(v < tol for v in errs.values()) and past == 0 and empty_dw == 0
                row = {"check": "grouped_matmul", "backend": b, "dtype": jnp.dtype(dtype).name, **errs,
                       "rows_past_groups_max": past, "empty_group_dw_max": empty_dw, "ok": ok}
            except Exception as e:  # pragma: no cover - GPU only
                row = {"check": "grouped_matmul", "backend": b, "dtype": jnp.dtype(dtype).name, "ok": False,
                       "error": (str(e).splitlines() or [type(e).__name__])[0][:300]}
                traceback.print_exc(limit=2)
            results.append(row)
            log(json.dumps(row))
    return results


# Tile candidates of the sweep (shared memory checked before compiling).
_GMM_CANDIDATES = [dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=s, grid_block_n=g)
                   for bm, bn, s, g in ((128, 128, 4, 1), (128, 128, 4, 4), (128, 192, 4, 1), (128, 256, 3, 1),
                                        (64, 128, 5, 1), (128, 128, 6, 8))]
_TGMM_CANDIDATES = [dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=s, grid_block_n=g)
                    for bm, bn, s, g in ((128, 128, 4, 1), (128, 128, 2, 4), (64, 128, 4, 1), (128, 64, 4, 1))]


def preset_shapes():
    """(kind, rows, K, N) of the three grouped products fwd / input grad / weight grad of both expert
    projections (gate and up fused) of the small and medium presets, batch 2 x 8K / 1 x 8K tokens."""
    out = []
    for rows, H, I in ((32768, 1024, 384), (16384, 2048, 3072)):
        out += [("gmm", rows, H, 2 * I), ("gmm", rows, I, H), ("gmm_t", rows, 2 * I, H), ("gmm_t", rows, H, I),
                ("tgmm", rows, H, 2 * I), ("tgmm", rows, I, H)]
    return out


def sweep(log, shapes=None, budget_s=120.0):
    from pallas_kernels.moe import gpu_mosaic

    start = time.perf_counter()
    best = {}
    for kind, rows, K, N in shapes or preset_shapes():
        sizes = jnp.asarray(balanced_sizes(rows, EXPERTS))
        x = jax.random.normal(jax.random.key(0), (rows, K), jnp.float32).astype(BF16)
        cands = _TGMM_CANDIDATES if kind == "tgmm" else _GMM_CANDIDATES
        for cfg in cands:
            if time.perf_counter() - start > budget_s:
                log(json.dumps({"sweep": "stopped (budget)"}))
                return best
            if N % cfg["block_n"] or (kind == "tgmm" and K % cfg["block_m"]):
                continue
            smem = (gpu_mosaic.tgmm_smem_bytes(cfg["block_m"], cfg["block_n"], 64, cfg["max_concurrent_steps"])
                    if kind == "tgmm" else gpu_mosaic.gmm_smem_bytes(cfg["block_m"], cfg["block_n"], 64,
                                                                      cfg["max_concurrent_steps"]))
            if smem > gpu_mosaic.SMEM_BYTES:
                continue
            try:
                if kind == "tgmm":
                    dy = jax.random.normal(jax.random.key(1), (rows, N), jnp.float32).astype(BF16)
                    f = jax.jit(functools.partial(gpu_mosaic.tgmm, **cfg))
                    t = time_call(f, x, dy, sizes)
                else:
                    shape = (EXPERTS, N, K) if kind == "gmm_t" else (EXPERTS, K, N)
                    w = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(BF16)
                    f = jax.jit(functools.partial(gpu_mosaic.gmm, transpose_rhs=kind == "gmm_t", **cfg))
                    t = time_call(f, x, w, sizes)
            except Exception as e:  # pragma: no cover - GPU only
                log(json.dumps({"sweep": kind, "K": K, "N": N, **cfg, "error": str(e).splitlines()[0][:200]}))
                continue
            tf = 2 * rows * K * N / t / 1e12
            log(json.dumps({"sweep": kind, "rows": rows, "K": K, "N": N, **cfg, "ms": t * 1e3, "tflops": tf}))
            key = f"{kind}:{K}:{N}"
            if key not in best or tf > best[key]["tflops"]:
                best[key] = {**cfg, "tflops": tf}
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="bench", choices=("bench", "check", "sweep", "all"))
    ap.add_argument("--backends", default="dense,xla,mosaic_gpu,triton")
    ap.add_argument("--shapes", default=None, help="rows x K x N, comma separated (default: the issue's four)")
    ap.add_argument("--sweep_budget_s", type=float, default=120.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out_dir = args.out
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = jax.devices()[0]
    header = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "experts": EXPERTS, "dtype": "bfloat16"}
    log(json.dumps(header))
    backends = [b for b in args.backends.split(",") if b]
    grouped = [b for b in backends if b != "dense"]
    result = {"header": header}
    if args.mode in ("check", "all"):
        result["check"] = check(grouped, log)
    rows = []
    if args.mode in ("bench", "all"):
        shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        for (M, K, N) in shapes:
            for b in backends:
                try:
                    name = b if b == "dense" else f"{b}->{resolve_backend('gmm', b, M, K, N, BF16)}"
                    tf, tb = bench_shape(M, K, N, b)
                    row = {"rows": M, "K": K, "N": N, "backend": b, "resolved": name, "fwd_ms": tf * 1e3,
                           "fwdbwd_ms": tb * 1e3, "fwd_tflops": 2 * M * K * N / tf / 1e12,
                           "fwdbwd_tflops": 6 * M * K * N / tb / 1e12}
                except Exception as e:  # pragma: no cover - GPU only
                    row = {"rows": M, "K": K, "N": N, "backend": b, "error": (str(e).splitlines() or ["?"])[0][:300]}
                rows.append(row)
                log(json.dumps(row))
        result["bench"] = rows
    if args.mode in ("sweep", "all"):
        result["sweep_best"] = sweep(log, budget_s=args.sweep_budget_s)
        log(json.dumps({"sweep_best": result["sweep_best"]}))
    if out_dir:
        with open(os.path.join(out_dir, "moe.json"), "w") as f:
            json.dump(result, f, indent=1)
    if rows:
        print(f"\n{header['device']}, jax {header['jax']}, {EXPERTS} experts, random balanced routing, bf16; "
              "TFLOP/s forward / forward+backward (useful FLOPs)")
        shapes_seen = sorted({(r["rows"], r["K"], r["N"]) for r in rows}, key=lambda s: SHAPES.index(s)
                             if s in SHAPES else 99)
        print(f"{'rows x K x N':<20}" + "".join(f"{b:>20}" for b in backends) + f"{'best / dense':>16}")
        for s in shapes_seen:
            cells, best, dense = [], 0.0, None
            for b in backends:
                r = next((r for r in rows if (r["rows"], r["K"], r["N"]) == s and r["backend"] == b), None)
                if r is None or "error" in r:
                    cells.append(f"{'failed':>20}")
                    continue
                cells.append(f"{r['fwd_tflops']:>9.0f} / {r['fwdbwd_tflops']:<8.0f}")
                if b == "dense":
                    dense = r
                else:
                    best = max(best, r["fwdbwd_tflops"])
            ratio = f"{best / dense['fwdbwd_tflops']:.0%}" if dense and best else "-"
            print(f"{'x'.join(map(str, s)):<20}" + "".join(cells) + f"{ratio:>16}")
        if out_dir:
            _plot(rows, backends, os.path.join(out_dir, "moe.png"), header)
    return 0


def _plot(rows, backends, path, header):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    shapes = sorted({(r["rows"], r["K"], r["N"]) for r in rows if "error" not in r})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / max(1, len(backends))
    for ax, key, title in ((axes[0], "fwd_tflops", "forward"), (axes[1], "fwdbwd_tflops", "forward + backward")):
        for i, b in enumerate(backends):
            vals = [next((r[key] for r in rows if (r["rows"], r["K"], r["N"]) == s and r["backend"] == b
                          and "error" not in r), 0.0) for s in shapes]
            ax.bar(np.arange(len(shapes)) + i * width, vals, width, label=b)
        ax.set_xticks(np.arange(len(shapes)) + width * (len(backends) - 1) / 2)
        ax.set_xticklabels(["x".join(map(str, s)) for s in shapes], rotation=15, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("TFLOP/s (useful)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"grouped GEMM, {EXPERTS} experts, bf16, {header['device']}, jax {header['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
