"""`unetdist <command>`: each area of the package registers its own subcommands here.

Registration modules only parse arguments and import their implementation lazily. Parsing, logging
and error reporting are `unetdist.data.console`'s, shared with `python -m unetdist.train` and
`python -m unetdist.infer`, so every way in behaves the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unetdist.data.console import main as run_main
from unetdist.data.console import new_parser

# One line per area; each module has `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "unetdist.data.commands",
    "unetdist.train.commands",
    "unetdist.bench.commands",
    "unetdist.infer.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("unetdist", "Distributed U-Net training for tiled microscopy images.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from unetdist.parallel.env import launch_rank, launch_world_size

    return run_main(build_parser(), argv, lambda args: f"unetdist {args.command}", launch_rank(), launch_world_size())


if __name__ == "__main__":
    sys.exit(main())
