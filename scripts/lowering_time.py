"""Trace and lower a preset's train step for CUDA on any machine, GPU or not, and report the time and the size of the module.

The lowering is the host-side share of a step's compile time (measured on an H200: 36 s of the `small`
step's 151 s). The Hopper kernels are forced, so the module is the one an H100/H200 compiles: the Mosaic
GPU lightning kernels and the Mosaic grouped GEMMs of the MoE.

    python scripts/lowering_time.py                         # small, batch 2 x 8K
    python scripts/lowering_time.py --preset medium --batch 1 --packed
    python scripts/lowering_time.py --profile 25            # and the 25 costliest calls (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pallas_kernels.lightning.op as lightning_op  # noqa: E402
import sharding  # noqa: E402
from m1_jax import ModelConfig  # noqa: E402
from m1_jax.train import step as step_lib  # noqa: E402
from m1_jax.train.config import OptimizerConfig  # noqa: E402
from m1_jax.train.optimizer import make_optimizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--packed", action="store_true", help="segment ids (packed rows)")
    ap.add_argument("--profile", type=int, default=0, help="print this many costliest calls")
    args = ap.parse_args(argv)

    lightning_op.is_hopper = lambda *a, **k: True  # the kernel choice of an H100/H200
    cfg = ModelConfig.preset(args.preset, lightning_backend="pallas_gpu", moe_backend="mosaic_gpu")
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=10), 1000)
    sharding.make_mesh(sharding.MeshConfig())
    abs_state = step_lib.abstract_state(cfg, tx, 0)
    graphdef, _ = step_lib.abstract_model(cfg)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, sched, aux_loss_coef=cfg.router_aux_loss_coef,
                                            z_loss_coef=1e-4, loss_chunk_size=4096, head_dtype="bfloat16",
                                            use_segment_ids=args.packed))
    shape = (args.batch, args.seq)
    batch = {"inputs": jax.ShapeDtypeStruct(shape, np.int32), "targets": jax.ShapeDtypeStruct(shape, np.int32),
             "segment_ids": jax.ShapeDtypeStruct(shape, np.int32),
             "loss_mask": jax.ShapeDtypeStruct(shape, np.float32)}
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    traced = step.trace(abs_state, batch)
    t1 = time.perf_counter()
    lowered = traced.lower(lowering_platforms=("cuda",))
    t2 = time.perf_counter()
    if prof:
        prof.disable()
    text = lowered.as_text()
    print(f"{args.preset}, batch {args.batch} x {args.seq}{' packed' if args.packed else ''}, jax {jax.__version__}: "
          f"trace {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, module {len(text) / 1e6:.1f} MB of text, "
          f"{text.count('stablehlo.custom_call')} custom calls, {text.count('func.func')} functions")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
