"""Argument parsing for `unetdist train` (the same entry point as `python -m unetdist.train`) and `unetdist export`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from unetdist.train.__main__ import train_main

    return train_main(args)


def _export(args: argparse.Namespace) -> int:
    from unetdist.train.export import export_model

    used = export_model(Path(args.checkpoint), Path(args.out))
    print(f"exported {used} to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from unetdist.train.__main__ import add_arguments

    p = sub.add_parser("train", help="train a UNet (same as python -m unetdist.train; use torchrun for several processes)")
    add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="turn a checkpoint (DDP file, DeepSpeed folder at any ZeRO stage, or run folder) "
                                      "into one plain model file for inference")
    p.add_argument("checkpoint", help="checkpoint file, DeepSpeed step_* folder, or run folder (newest checkpoint)")
    p.add_argument("--out", required=True, help="model file to write, e.g. model.pt")
    p.set_defaults(func=_export)
