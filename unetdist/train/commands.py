"""Argument parsing for `unetdist train` (the same entry point as `python -m unetdist.train`)."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from unetdist.train.__main__ import train_main

    return train_main(args)


def register(sub: argparse._SubParsersAction) -> None:
    from unetdist.train.__main__ import add_arguments

    p = sub.add_parser("train", help="train a UNet (same as python -m unetdist.train; use torchrun for several processes)")
    add_arguments(p)
    p.set_defaults(func=_train)
