"""``m1-jax convert``: ``hf-to-orbax SRC DST`` and ``orbax-to-hf SRC DST`` (``--dry-run`` checks only)."""

from __future__ import annotations

import argparse
import os
import sys

from m1_jax.config import ConfigError
from m1_jax.convert.errors import CheckpointError

from m1_jax.dtypes import DTYPE_NAMES as DTYPES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m1-jax convert", description="Convert MiniMax checkpoints between "
                                "Hugging Face safetensors folders and Orbax checkpoints, one tensor at a time.",
                                epilog="m1-jax convert DIRECTION --help shows the options of one direction. "
                                       "See docs/conversion.md.")
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF / original MiniMax safetensors folder -> Orbax checkpoint",
                       description="Convert a Hugging Face / original MiniMax safetensors folder to an Orbax "
                                   "checkpoint of the model's parameters (restores onto any mesh).")
    a.add_argument("src", metavar="SRC", help="folder with config.json and *.safetensors (with "
                   "model.safetensors.index.json when there are several files)")
    a.add_argument("dst", metavar="DST", nargs="?", help="Orbax checkpoint folder to write (not needed with "
                   "--dry-run)")
    a.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the checkpoint's); the router "
                   "stays float32")
    a.add_argument("--dry-run", action="store_true", help="check config.json, the index and (when the files are "
                   "there) the safetensors headers against the key table; read no weights")
    b = sub.add_parser("orbax-to-hf", help="Orbax or training checkpoint -> HF safetensors folder",
                       description="Convert an Orbax checkpoint, or a checkpoint written by train.py, to a "
                                   "Hugging Face safetensors folder that transformers' MiniMaxForCausalLM loads.")
    b.add_argument("src", metavar="SRC", help="an Orbax checkpoint folder (hf-to-orbax, "
                   "m1_jax.convert.save_orbax) or a training checkpoint: a run folder (its latest step), its "
                   "checkpoints/ folder or a step folder such as runs/tiny/checkpoints/200")
    b.add_argument("dst", metavar="DST", nargs="?", help="HF folder to write (not needed with --dry-run)")
    b.add_argument("--dtype", choices=DTYPES, help="tensor dtype (default: the config's param_dtype)")
    b.add_argument("--router-dtype", choices=DTYPES,
                   help="router (block_sparse_moe.gate) dtype (default: the source HF checkpoint's, else float32)")
    b.add_argument("--max-shard-size", metavar="SIZE", default="5GB",
                   help="largest safetensors file, e.g. 500MB (default 5GB)")
    b.add_argument("--dry-run", action="store_true", help="check the checkpoint's config, parameter tree and "
                   "shapes (from the zarr metadata); read no weights")
    for s in (a, b):
        s.add_argument("--overwrite", action="store_true", help="if DST exists, replace the checkpoint files in it "
                       "(files the converter did not write are kept)")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.dry_run:
            from m1_jax.convert.check import dry_run_hf, dry_run_orbax

            report = dry_run_hf(args.src, args.dtype) if args.direction == "hf-to-orbax" else dry_run_orbax(args.src)
            print(report.text())
            if args.dst and os.path.exists(args.dst) and not args.overwrite:
                print(f"  note: {args.dst} already exists (a real run needs --overwrite)")
            return 0
        if not args.dst:
            print(f"m1-jax convert {args.direction}: DST is required (or pass --dry-run)", file=sys.stderr)
            return 2
        from m1_jax.convert import orbax_io

        if args.direction == "hf-to-orbax":
            config = orbax_io.hf_to_orbax(args.src, args.dst, dtype=args.dtype, progress=not args.quiet,
                                          overwrite=args.overwrite)
        else:
            config = orbax_io.orbax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                          router_dtype=args.router_dtype, progress=not args.quiet,
                                          overwrite=args.overwrite)
        print(f"wrote {args.dst} ({config.num_params()['total']:,} parameters)")
        return 0
    except (CheckpointError, ConfigError) as e:
        print(f"m1-jax convert {args.direction}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder that cannot be read or written
        print(f"m1-jax convert {args.direction}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
