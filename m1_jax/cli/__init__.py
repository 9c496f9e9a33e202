"""``m1-jax`` command line: ``m1-jax {convert,flops,generate,train} ...`` (also ``python -m m1_jax.cli``).

Each subcommand lives in its own module with a ``main(argv)``; they are imported lazily so that one
command never pays for another's imports. ``m1-jax COMMAND --help`` shows a command's options.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "convert": ("m1_jax.convert.cli", "checkpoint conversion: hf-to-orbax, orbax-to-hf (see docs/conversion.md)"),
    "flops": ("m1_jax.flops", "analytic FLOPs table and the paper's figure (see docs/flops.md)"),
    "generate": ("m1_jax.cli.generate", "continue prompts with a checkpoint (cached decoding, sampling)"),
    "train": ("m1_jax.train", "pretraining and RL fine-tuning from gin configs (= python train.py; docs/training.md)"),
}
# Commands that may run on many hosts start jax.distributed first, as train.py does (a no-op on one machine).
DISTRIBUTED = ("train",)


def usage() -> str:
    lines = ["usage: m1-jax COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "m1-jax COMMAND --help shows the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"m1-jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in DISTRIBUTED:
        import sharding

        sharding.initialize_distributed()  # multi-host: from the environment
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as e:  # argparse's --help and usage errors: the same exit status, returned
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
