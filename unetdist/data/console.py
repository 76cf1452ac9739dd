"""What every command does the same way: its parser, its logging, and how a user's mistake is reported.

`unetdist <command>`, `python -m unetdist.train` and `python -m unetdist.infer` all go through here, so
the same flags show the same defaults, log lines look alike on every rank, and a mistake the user must
fix (`UserError`) is one line on stderr with exit status 2, while a bug keeps its traceback. It lives in
the data layer, the lowest one with commands of its own (synth, shard, fetch); layers above reuse it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from unetdist.config import ConfigError, UsageError, UserError

EXIT_USER_ERROR = 2  # restarting a run that ended with it would fail the same way
EXIT_INTERRUPTED = 130  # the shell's code for a program stopped by Ctrl-C (128 + SIGINT)
# OSErrors about a path the user gave (a missing input, a folder where a file belongs): also one line.
USER_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
# Raised identically on every rank (same config, same arguments): printed by rank 0 only under torchrun.
SAME_ON_EVERY_RANK = (ConfigError, UsageError)


def log_format(rank: int = 0, world_size: int = 1) -> str:
    where = f" [rank {rank}]" if world_size > 1 else ""
    return f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int = 0, world_size: int = 1) -> None:
    """The one logging set-up: INFO on rank 0, WARNING on the others, to stderr, rank in every line.

    Called once by every entry point before a command runs; calling it again replaces the handlers,
    so a test or a second command in the same process does not log twice.
    """
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=log_format(rank, world_size),
                        stream=sys.stderr, force=True)


def add_log_file(path: Path) -> logging.Handler:
    """Also write this process's log lines to `path` (benchmarks keep their log beside their JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    handler.setFormatter(formatter or logging.Formatter(log_format()))
    root.addHandler(handler)
    return handler


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show (None, off) or the help has its own
    `(default ...)` clause (for defaults that are a rule, like `overlap/4`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "(default" in text:
            return text
        return super()._get_help_string(action)


def new_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (commands, and their subcommands), each once."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *subparsers(child)]
    return found


def use_help_formatter(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give `parser` and every subcommand's parser the same help format, whoever registered it."""
    for p in [parser, *subparsers(parser)]:
        p.formatter_class = HelpFormatter
    return parser


class _Deprecated(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        logging.getLogger("unetdist").warning("%s is deprecated and will be removed: use %s", option_string,
                                              self.metavar)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Accept the old spelling `old` of option `new` for a while, with a warning; hidden from --help."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_Deprecated, metavar=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


MODEL_HELP = "trained model: checkpoint file, DeepSpeed step_* folder, run folder (its newest checkpoint) or model file"


def model_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--model PATH`, the one way every command names a trained model; the old positional form still works."""
    parser.add_argument("--model", help=MODEL_HELP + (" (required)" if required else ""))
    parser.set_defaults(model_required=required)


def positional_model(args: argparse.Namespace, positionals: list[str], command: str) -> list[str]:
    """Take `--model` from the deprecated positional form `unetdist COMMAND MODEL ...` when it was not given."""
    if args.model is None and positionals:
        logging.getLogger("unetdist").warning("`unetdist %s MODEL ...` is deprecated and will be removed: use "
                                              "--model MODEL", command)
        args.model, positionals = positionals[0], positionals[1:]
    if args.model is None and args.model_required:
        raise UsageError("--model is required: " + MODEL_HELP)
    return positionals


def one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def report_user_error(name: str, exc: BaseException, rank: int = 0) -> None:
    """One line on stderr. Under torchrun a mistake every rank makes alike is printed by rank 0 only."""
    if rank == 0:
        sys.stderr.write(f"{name}: {one_line(exc)}\n")
    elif not isinstance(exc, SAME_ON_EVERY_RANK):
        sys.stderr.write(f"{name} (rank {rank}): {one_line(exc)}\n")
    sys.stderr.flush()


def run_command(args: argparse.Namespace, name: str, rank: int = 0) -> int:
    """Run the command `args.func`; a user's mistake -> one line and exit 2, anything else propagates."""
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UserError, *USER_FILE_ERRORS) as exc:
        report_user_error(name, exc, rank)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a failure to explain with a traceback
        if rank == 0:
            sys.stderr.write(f"\n{name}: interrupted\n")
        return EXIT_INTERRUPTED


def main(parser: argparse.ArgumentParser, argv: list[str] | None, name: Callable[[argparse.Namespace], str],
         rank: int = 0, world_size: int = 1) -> int:
    """Parse, set up logging, run: the body of every entry point (`rank` from the launcher's environment)."""
    setup_logging(rank, world_size)  # first, so a deprecated option's warning is formatted like the rest
    args = use_help_formatter(parser).parse_args(argv)
    return run_command(args, name(args), rank)
