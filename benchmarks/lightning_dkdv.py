"""Two strategies of the Mosaic GPU lightning kernels against each other, in one run on one GPU: errors of the
output, final state and every gradient against the float32 chunked reference, and forward and forward+backward
times with the HBM floor. ``--variants dkdv`` (the default): the fused dk/dv backward walk
(``pallas_kernels/lightning/gpu_mosaic_dkdv.py``) against the two separate walks it replaces; ``--variants
wide``: the wide walks (``gpu_mosaic_wide.py``, both column pieces in one program) against one program per piece.

    python benchmarks/lightning_dkdv.py --out results [--variants wide] [--shapes 16x16x16384x128,1x8x4096x128]

Prints a table and writes ``lightning_<variants>.json``. Training setting (no initial state) and, with
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
PRESETS = {
    # the fused walk wherever it applies (at its own segment count), and the separate walks
    "dkdv": {"fused": {"fused_dkdv": "always"}, "separate": {"fused_dkdv": False}},
    # the wide walks (the shipped plan), and one program per column piece
    "wide": {"wide": {}, "narrow": {"wide": False}},
}


def measure(shape, state, bandwidth, variants):
    import jax
    import jax.numpy as jnp
    from pallas_kernels.lightning import reference
    import lightning_bench as la
    B, H, T, D = shape
    x = w._inputs(B, H, T, D, seed=11, h0=state)
    a = (x["q"], x["k"], x["v"], x["decay"], x["h0"], x["do"], x["dht"])
    f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
    ref = lambda q, k, v, d, h0: reference.lightning_attention_chunked(f32(q), f32(k), f32(v), d, h0, 64)  # noqa
    want = jax.jit(w._grad_fn(ref, state))(*a) + jax.jit(ref)(*a[:5])
    floor_ms = shape_bytes(B, H, T, D, bwd=True, h0=state) / bandwidth * 1e3
    row = dict(shape=list(shape), setting="state" if state else "train", floor_ms=floor_ms,
               floor_fwd_ms=shape_bytes(B, H, T, D, bwd=False, h0=state) / bandwidth * 1e3)
    for name, tuning in variants.items():
        f = jax.jit(w._ours(tuning))
        g = jax.jit(w._grad_fn(w._ours(tuning), state))
        got = jax.block_until_ready(g(*a)) + jax.block_until_ready(f(*a[:5]))
        row[f"{name}_err"] = max(la.rel(u, v) for u, v in zip(got, want))
        row[f"{name}_fwd_ms"] = None if INTERPRET else w.time_call(f, a[:5])[0]  # the medians
        row[f"{name}_ms"] = None if INTERPRET else w.time_call(g, a)[0]
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--shapes", default="", help="comma-separated BxHxTxD (default: SHAPES)")
    p.add_argument("--state", action="store_true", help="also with an initial state and final-state cotangent")
    p.add_argument("--bandwidth", type=float, default=4.21e12, help="bytes/s for the floor (H200: 4.21e12)")
    p.add_argument("--variants", default="dkdv", choices=sorted(PRESETS))
    args = p.parse_args()
    variants = PRESETS[args.variants]
    (na, _), (nb, _) = variants.items()
    import jax
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES
    if INTERPRET:
        shapes = [(1, 1, 2 * 64 + 5, 128)]
    dev = jax.devices()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                device=dev.device_kind, jax=jax.__version__, command=" ".join(sys.argv), bandwidth=args.bandwidth,
                variants=variants)
    print(json.dumps(meta), flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every point: a run cut short by its time limit keeps what it measured
        with open(os.path.join(args.out, f"lightning_{args.variants}.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"| B,H,T,D | setting | fwd {na} ms | × floor | fwd {nb} ms | × floor | fwd+bwd {na} ms | × floor | "
          f"fwd+bwd {nb} ms | × floor | {na} / {nb} fwd, fwd+bwd | max rel. err {na}, {nb} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for state in ((False, True) if args.state else (False,)):
            try:
                r = measure(shape, state, args.bandwidth, variants)
            except Exception as e:  # one failing point must not lose the others
                r = dict(shape=list(shape), setting="state" if state else "train", error=repr(e)[:600])
                print(f"| {shape} | error: {r['error']} |", flush=True)
                rows.append(r)
                save()
                continue
            rows.append(r)
            save()
            cells, ratios = [], []
            for key, floor in (("fwd_ms", r["floor_fwd_ms"]), ("ms", r["floor_ms"])):
                ma, mb = r[f"{na}_{key}"], r[f"{nb}_{key}"]
                cells += [f"{m:.3f} | {m / floor:.2f}" if m else "- | -" for m in (ma, mb)]
                ratios.append(f"{ma / mb:.2f}" if ma and mb else "-")
            print(f"| {','.join(map(str, shape))} | {r['setting']} | {' | '.join(cells)} | {', '.join(ratios)} | "
                  f"{r[f'{na}_err']:.1e}, {r[f'{nb}_err']:.1e} |", flush=True)
    errs = [max(r[f"{na}_err"], r[f"{nb}_err"]) for r in rows if f"{na}_err" in r]
    ok = len(errs) == len(rows) and all(np.isfinite(errs)) and max(errs) < 2e-2
    print(f"{args.variants} check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
