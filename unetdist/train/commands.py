"""Argument parsing for `unetdist train` (the same entry point as `python -m unetdist.train`) and `unetdist export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from unetdist.data.console import model_option, positional_model


def _export(args: argparse.Namespace) -> int:
    from unetdist.train.export import export_model

    positional_model(args, [args.legacy_model] if args.legacy_model else [], "export")
    used = export_model(Path(args.model), Path(args.out))
    print(f"exported {used} to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from unetdist.train.__main__ import add_arguments

    p = sub.add_parser("train", help="train a UNet (same as python -m unetdist.train; use torchrun for several processes)")
    add_arguments(p)

    p = sub.add_parser("export", help="turn a checkpoint (DDP file, DeepSpeed folder at any ZeRO stage, or run folder) "
                                      "into one plain model file for inference")
    model_option(p)
    p.add_argument("legacy_model", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="model file to write, e.g. model.pt")
    p.set_defaults(func=_export)
