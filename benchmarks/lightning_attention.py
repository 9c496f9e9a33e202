"""Lightning-attention benchmark on one GPU: our Pallas kernels vs the XLA reference, cuDNN softmax
flash attention and fla's Triton ``chunk_simple_gla``.

    python benchmarks/lightning_attention.py --out results/        # check + bench, table + PNG
    python benchmarks/lightning_attention.py --mode tune           # sweep kernel configs per shape
    python benchmarks/lightning_attention.py --mode check          # GPU correctness only
    python benchmarks/lightning_attention.py --mode sweep --fla --checks --short --f32 --out results/
                                                                    # shape sweep vs the HBM floor
    python benchmarks/lightning_attention.py --mode sweep-report --inputs results/sweep_run.json

``bench`` prints a table (ms forward / forward+backward, TFLOP/s) and writes ``lightning_attention.png``
and ``lightning_attention.json`` to ``--out``: bf16 inputs, MiniMax-style slopes, in two settings
(``--settings``): "state" (an initial state given and a final-state cotangent of ones, for every
linear kernel) and "train" (neither). fla is optional (skipped if not importable).
FLOPs: lightning forward ``B H T (2 C (Dk + Dv) + 4 Dk Dv)`` at C=64 for every linear kernel (the
same nominal count for all), fwd+bwd = 3x forward; causal softmax forward ``2 B H T^2 D``,
fwd+bwd = 3.5x forward. ``sweep`` is described in ``lightning_sweep.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402

from lightning_bench import SHAPES, available_impls, bench, check, plot, table, tune  # noqa: E402

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="all", choices=["all", "check", "tune", "bench", "report", "sweep", "sweep-report",
                                                   "worker"])
    p.add_argument("--inputs", default="", help="report: comma-separated lightning_attention.json files to merge")
    p.add_argument("--out", default=".")
    p.add_argument("--shapes", default="all", help="'all', indices into SHAPES (0,2) or shapes BxHxTxD (8x16x512x128)")
    p.add_argument("--impls", default="all")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--no-cudnn", action="store_true")
    p.add_argument("--settings", default="state,train",
                   help="bench: 'state' (initial state and final-state cotangent given), 'train' (neither), or both")
    g = p.add_argument_group("sweep (see lightning_sweep.py)")
    g.add_argument("--variants", default="default", help="comma-separated presets of lightning_sweep.PRESETS")
    g.add_argument("--tag", default="run", help="names the outputs: sweep_<tag>.json/.png/.log")
    g.add_argument("--budget", type=float, default=500.0, help="seconds: tasks not started by then are skipped")
    g.add_argument("--workers", type=int, default=5, help="processes that compile in parallel")
    g.add_argument("--mem-fraction", type=float, default=0.14, help="GPU memory per worker process")
    g.add_argument("--fla", action="store_true", help="time fla at the benchmark shapes and three grid corners")
    g.add_argument("--checks", action="store_true", help="bf16 correctness at a sample of the grid, packed rows")
    g.add_argument("--short", action="store_true", help="short prefill chunks and the decode step")
    g.add_argument("--f32", action="store_true", help="float32 candidates (lightning_f32.py), one process each")
    g.add_argument("--f32-timeout", type=float, default=100.0)
    g.add_argument("--bandwidth", type=float, default=0.0,
                   help="sweep-report: floors at this many bytes/s instead of the run's measured bandwidth")
    g.add_argument("--fastest", action="store_true",
                   help="sweep-report: each point's fastest run instead of its median (a run that other GPU work "
                        "slowed can only be slower)")
    g.add_argument("--f32-configs", default="", help="comma-separated names of lightning_f32.CONFIGS (default all)")
    g.add_argument("--tasks", default="", help=argparse.SUPPRESS)
    g.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    g.add_argument("--lock", default="", help=argparse.SUPPRESS)
    g.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode == "sweep-report":  # a saved sweep's tables and heat map again (no GPU)
        import lightning_sweep
        lightning_sweep.report_main(args)
        return
    if args.mode == "worker":  # one process of a sweep (spawned by --mode sweep)
        import lightning_sweep_worker
        lightning_sweep_worker.worker_main(args.tasks, args.worker_out, args.lock, args.deadline)
        return
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "report":  # merge the rows of earlier bench runs into one table and plot (no GPU)
        runs = [json.load(open(f)) for f in args.inputs.split(",") if f]
        rows = [r for run in runs for r in run["rows"]]
        for run in runs:
            print(json.dumps(run["meta"]))
        print(table(rows))
        plot(rows, os.path.join(args.out, "lightning_attention.png"))
        return
    # indices into SHAPES, or explicit shapes written BxHxTxD
    shapes = SHAPES if args.shapes == "all" else [
        tuple(int(d) for d in i.split("x")) if "x" in i else SHAPES[int(i)] for i in args.shapes.split(",")]
    impls = available_impls() if args.impls == "all" else [i for i in args.impls.split(",") if i]
    dev = jax.devices()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                device=dev.device_kind, jax=jax.__version__, command=" ".join(sys.argv))
    try:
        import torch
        meta["torch"] = torch.__version__
        import triton
        meta["triton"] = triton.__version__
        import fla
        meta["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        pass
    meta["compute_capability"] = getattr(dev, "compute_capability", None)
    meta["sm_count"] = getattr(dev, "core_count", None)
    print(json.dumps(meta))
    if args.mode == "sweep":
        import lightning_sweep
        lightning_sweep.sweep_main(args, meta)
        return
    if args.mode in ("all", "check"):
        print("GPU correctness:", "PASS" if check(impls) else "FAIL")
    if args.mode == "tune":
        res = tune(impls, shapes)
        with open(os.path.join(args.out, "lightning_tune.json"), "w") as f:
            json.dump(dict(meta=meta, results=res), f, indent=1)
    if args.mode in ("all", "bench"):
        rows = bench(impls, shapes, args.out, with_fla=not args.no_fla, with_cudnn=not args.no_cudnn,
                     settings=tuple(args.settings.split(",")))
        print(table(rows))
        with open(os.path.join(args.out, "lightning_attention.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        plot(rows, os.path.join(args.out, "lightning_attention.png"))


if __name__ == "__main__":
    main()
