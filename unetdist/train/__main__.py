"""Entry point torchrun starts: load config, join the process group, train, always leave the group.

`python -m unetdist.train ARGS` is `unetdist train ARGS`: the same arguments, logging and error lines.
"""

from __future__ import annotations

import argparse
import logging
import sys

from unetdist.config import load_config
from unetdist.data.console import main as run_main
from unetdist.data.console import new_parser
from unetdist.parallel.env import destroy_distributed, init_distributed, launch_rank, launch_world_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config, e.g. configs/default.yaml (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. train.steps=100")
    # The `deepspeed` launcher appends --local_rank=N; the device follows LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=train_main)


def train_main(args: argparse.Namespace) -> int:
    """Train; a config mistake raises `ConfigError` (one line, exit 2) before any process group exists."""
    cfg = load_config(args.config, args.overrides)
    if cfg.parallel.backend == "deepspeed":  # validate the generated DeepSpeed config before any group work
        from unetdist.parallel.deepspeed_config import deepspeed_config

        deepspeed_config(cfg, launch_world_size())
    from unetdist.train.loop import run  # after the config check, so config errors come back fast
    from unetdist.train.preemption import Preempted

    env = init_distributed(group_for_one=cfg.parallel.backend == "deepspeed")  # DeepSpeed needs a group, even of one
    try:
        run(cfg, env)
    except Preempted as exc:
        logging.getLogger("unetdist").warning("%s (exit code %d)", exc, exc.exit_code)
        return exc.exit_code
    finally:
        destroy_distributed()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m unetdist.train", "Train a UNet (1 process or under torchrun); "
                                                    "the same as `unetdist train`.")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv, lambda args: "unetdist train", launch_rank(), launch_world_size())


if __name__ == "__main__":
    sys.exit(main())
