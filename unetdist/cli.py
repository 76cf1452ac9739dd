"""`unetdist <command>`: each area of the package registers its own subcommands here.

Registration modules only parse arguments and import their implementation lazily, so
`unetdist --help` and config errors come back without loading torch-heavy code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unetdist.config import ConfigError

# One line per area; each module has `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "unetdist.data.commands",
    "unetdist.train.commands",
    "unetdist.bench.commands",
    "unetdist.infer.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetdist", description="Distributed U-Net training for tiled microscopy images.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"unetdist {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
