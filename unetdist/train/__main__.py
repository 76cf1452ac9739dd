"""Entry point torchrun starts: load config, join the process group, train, always leave the group."""

from __future__ import annotations

import argparse
import logging
import sys

from unetdist.config import ConfigError, load_config
from unetdist.parallel.env import destroy_distributed, init_distributed, launch_world_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config, e.g. configs/default.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. train.steps=100")
    # The `deepspeed` launcher appends --local_rank=N; the device follows LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def train_main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.parallel.backend == "deepspeed":  # validate the generated DeepSpeed config before any group work
            from unetdist.parallel.deepspeed_config import deepspeed_config

            deepspeed_config(cfg, launch_world_size())
    except ConfigError as exc:
        print(f"unetdist train: {exc}", file=sys.stderr)
        return 2
    from unetdist.train.loop import run  # after the config check, so config errors come back fast
    from unetdist.train.preemption import EXIT_RESUMABLE, Preempted
    env = init_distributed(group_for_one=cfg.parallel.backend == "deepspeed")  # DeepSpeed needs a group, even of one
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        run(cfg, env)
    except ConfigError as exc:
        logging.getLogger("unetdist").error("%s", exc)
        return 2
    except Preempted as exc:
        logging.getLogger("unetdist").warning("%s (exit code %d)", exc, EXIT_RESUMABLE)
        return EXIT_RESUMABLE
    finally:
        destroy_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unetdist.train", description="Train a UNet (1 process or under torchrun).")
    add_arguments(parser)
    return train_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
