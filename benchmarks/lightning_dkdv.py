"""The fused dk/dv backward walk (``pallas_kernels/lightning/gpu_mosaic_dkdv.py``) against the two separate
walks it replaces, in one run on one GPU: errors of every gradient against the float32 chunked reference, and
forward+backward times with the HBM floor.

    python benchmarks/lightning_dkdv.py --out results [--shapes 16x16x16384x128,1x8x4096x128] [--bandwidth 4.21e12]

Prints a table and writes ``lightning_dkdv.json``. Training setting (no initial state) and, with
``--state``, a random initial state and final-state cotangent. ``LIGHTNING_BENCH_INTERPRET=1`` runs a tiny
case in the Mosaic GPU interpreter (the CPU test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import lightning_sweep_worker as w  # noqa: E402
from lightning_sweep import INTERPRET, shape_bytes  # noqa: E402

SHAPES = [(16, 16, 16384, 128), (8, 16, 16384, 128), (8, 24, 16384, 128), (4, 16, 65536, 128), (1, 64, 8192, 128),
          (4, 16, 4096, 128), (8, 16, 2048, 128), (2, 16, 16384, 128), (2, 16, 65536, 128), (1, 24, 65536, 128),
          (1, 8, 131072, 128), (1, 8, 16384, 128), (1, 8, 4096, 128), (2, 16, 1024, 128), (4, 24, 16384, 128)]
# the fused walk wherever it applies (at its own segment count), and the separate walks
VARIANTS = {"fused": {"fused_dkdv": "always"}, "separate": {"fused_dkdv": False}}


def measure(shape, state, bandwidth):
    import jax
    import jax.numpy as jnp
    from pallas_kernels.lightning import reference
    import lightning_bench as la
    B, H, T, D = shape
    x = w._inputs(B, H, T, D, seed=11, h0=state)
    a = (x["q"], x["k"], x["v"], x["decay"], x["h0"], x["do"], x["dht"])
    f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
    ref = lambda q, k, v, d, h0: reference.lightning_attention_chunked(f32(q), f32(k), f32(v), d, h0, 64)  # noqa
    want = jax.jit(w._grad_fn(ref, state))(*a)
    floor_ms = shape_bytes(B, H, T, D, bwd=True, h0=state) / bandwidth * 1e3
    row = dict(shape=list(shape), setting="state" if state else "train", floor_ms=floor_ms)
    for name, tuning in VARIANTS.items():
        g = jax.jit(w._grad_fn(w._ours(tuning), state))
        got = jax.block_until_ready(g(*a))
        row[f"{name}_err"] = max(la.rel(u, v) for u, v in zip(got, want))
        row[f"{name}_ms"] = None if INTERPRET else w.time_call(g, a)[0]  # the median
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--shapes", default="", help="comma-separated BxHxTxD (default: SHAPES)")
    p.add_argument("--state", action="store_true", help="also with an initial state and final-state cotangent")
    p.add_argument("--bandwidth", type=float, default=4.21e12, help="bytes/s for the floor (H200: 4.21e12)")
    args = p.parse_args()
    import jax
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES
    if INTERPRET:
        shapes = [(1, 1, 2 * 64 + 5, 128)]
    dev = jax.devices()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                device=dev.device_kind, jax=jax.__version__, command=" ".join(sys.argv), bandwidth=args.bandwidth)
    print(json.dumps(meta), flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every point: a run cut short by its time limit keeps what it measured
        with open(os.path.join(args.out, "lightning_dkdv.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("| B,H,T,D | setting | fused ms | × floor | separate ms | × floor | fused / separate | max rel. err fused, separate |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for state in ((False, True) if args.state else (False,)):
            try:
                r = measure(shape, state, args.bandwidth)
            except Exception as e:  # one failing point must not lose the others
                r = dict(shape=list(shape), setting="state" if state else "train", error=repr(e)[:600])
                print(f"| {shape} | error: {r['error']} |", flush=True)
                rows.append(r)
                save()
                continue
            rows.append(r)
            save()
            fm, sm, fl = r["fused_ms"], r["separate_ms"], r["floor_ms"]
            t = (lambda m: f"{m:.3f} | {m / fl:.2f}") if fm else (lambda m: "- | -")
            ratio = f"{fm / sm:.2f}" if fm and sm else "-"
            print(f"| {','.join(map(str, shape))} | {r['setting']} | {t(fm)} | {t(sm)} | {ratio} | "
                  f"{r['fused_err']:.1e}, {r['separate_err']:.1e} |", flush=True)
    errs = [max(r["fused_err"], r["separate_err"]) for r in rows if "fused_err" in r]
    ok = len(errs) == len(rows) and all(np.isfinite(errs)) and max(errs) < 2e-2
    print("fused dk/dv check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
