"""The command-line surface: defaults in every --help, one convention, user mistakes vs bugs, progress lines.

Why: flags used to differ per command, `shard --help` showed no defaults, every ValueError (bugs too)
became a bare exit 2, and long commands printed nothing outside a terminal or filled log files with
carriage returns.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.conftest import PYTHON, run_cmd
from unetdist import cli
from unetdist.config import ConfigError, UsageError
from unetdist.data.console import HelpFormatter, run_command, subparsers
from unetdist.data.errors import DataError
from unetdist.data.progress import Progress, format_duration


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    from unetdist.bench.loader import add_loader_arguments
    from unetdist.infer.__main__ import build_parser as infer_parser
    from unetdist.train.__main__ import build_parser as train_parser

    top, infer = cli.build_parser(), infer_parser()
    found = {p.prog: p for p in [top, *subparsers(top), *subparsers(infer)]}
    found["python -m unetdist.train"] = train_parser()
    loader = argparse.ArgumentParser(prog="python -m unetdist.bench.loader", formatter_class=HelpFormatter)
    add_loader_arguments(loader)
    found[loader.prog] = loader
    return found


def _shown(action: argparse.Action) -> bool:
    return action.help is not argparse.SUPPRESS and not isinstance(action, (argparse._HelpAction,
                                                                             argparse._SubParsersAction))


def test_every_command_is_reachable_and_documents_every_option() -> None:
    parsers = _all_parsers()
    for name in ("unetdist synth", "unetdist shard", "unetdist fetch", "unetdist train", "unetdist export",
                 "unetdist predict", "unetdist evaluate", "unetdist bench", "unetdist bench train",
                 "unetdist bench smoke", "unetdist bench loader"):
        assert name in parsers, sorted(parsers)
    for prog, parser in parsers.items():
        for action in filter(_shown, parser._actions):
            assert action.help, f"{prog} {action.option_strings or action.dest}: no help text"


def test_help_shows_every_default() -> None:
    """Each option with a default shows it in --help (or its help text says what the default is)."""
    checked = 0
    for prog, parser in _all_parsers().items():
        parser.formatter_class = HelpFormatter  # what `unetdist` does for every registered command
        text = " ".join(parser.format_help().split())
        for action in filter(_shown, parser._actions):
            if not action.option_strings or action.default is None or action.default is False:
                continue
            checked += 1
            assert f"(default: {action.default})" in text or "(default" in action.help, (
                f"{prog} {action.option_strings[0]}: default {action.default!r} not shown")
    assert checked > 40, checked


def test_help_of_a_real_command_line() -> None:
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "shard", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for shown in ("--tile TILE tile size in pixels (default: 128)", "(default: 268435456)", "(default: classes)"):
        assert shown in text, text


def test_same_names_everywhere() -> None:
    """The model is `--model`, inputs `--images`, batches `--batch-size`, in every command that has them."""
    options = {prog: {s for a in p._actions if _shown(a) for s in a.option_strings}
               for prog, p in _all_parsers().items()}
    for prog in ("unetdist predict", "unetdist evaluate", "unetdist export"):
        assert "--model" in options[prog] and "--checkpoint" not in options[prog], prog
    for prog in ("unetdist predict", "unetdist evaluate", "unetdist shard"):
        assert "--images" in options[prog], prog
    for prog in ("unetdist predict", "unetdist evaluate", "unetdist bench", "unetdist bench smoke",
                 "unetdist bench loader"):
        assert "--batch-size" in options[prog] and "--batch" not in options[prog], prog
    assert "--count" in options["unetdist synth"] and "--images" not in options["unetdist synth"]
    # python -m unetdist.train / .infer are `unetdist train` / `predict` / `evaluate`: same options, same defaults
    same = {prog: sorted((a.dest, tuple(a.option_strings), repr(a.default)) for a in p._actions if _shown(a))
            for prog, p in _all_parsers().items()}
    assert same["unetdist train"] == same["python -m unetdist.train"]
    for command in ("predict", "evaluate"):
        assert same[f"unetdist {command}"] == same[f"python -m unetdist.infer {command}"]


def test_old_spellings_still_parse_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from unetdist.data.console import positional_model

    parser = cli.build_parser()
    with caplog.at_level(logging.WARNING):
        assert parser.parse_args(["bench", "--batch", "3"]).batch_size == 3
        assert parser.parse_args(["synth", "--out", "x", "--images", "5"]).count == 5
        assert parser.parse_args(["evaluate", "--checkpoint", "m.pt", "--labels", "l", "--out", "o"]).model == "m.pt"
        args = parser.parse_args(["predict", "run", "a.tif", "b.tif", "--out", "o"])
        assert positional_model(args, args.legacy, "predict") == ["a.tif", "b.tif"] and args.model == "run"
    warned = " ".join(r.getMessage() for r in caplog.records)
    for old in ("--batch", "--images", "--checkpoint", "unetdist predict MODEL"):
        assert old in warned, warned
    args = parser.parse_args(["predict", "--images", "a.tif", "--out", "o"])
    with pytest.raises(UsageError, match="--model is required"):
        positional_model(args, args.legacy, "predict")


def _func(exc: BaseException) -> argparse.Namespace:
    def raise_it(args: argparse.Namespace) -> int:
        raise exc

    return argparse.Namespace(func=raise_it)


def test_user_mistakes_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for exc in (DataError("img.tif: 3 channels\nbut the model takes 1"), UsageError("give --pred or --model"),
                FileNotFoundError("runs/x: no such model file")):
        assert run_command(_func(exc), "unetdist predict") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("unetdist predict: ") and "Traceback" not in err, err
    # another rank: its own file error is printed (as one line naming the rank), an argument error only by rank 0
    assert run_command(_func(DataError("b.tif: unreadable")), "unetdist predict", rank=1) == 2
    assert capsys.readouterr().err == "unetdist predict (rank 1): b.tif: unreadable\n"
    for same_everywhere in (UsageError("--tile 0"), ConfigError("unknown config key 'train.stepz'")):
        assert run_command(_func(same_everywhere), "unetdist predict", rank=1) == 2
        assert capsys.readouterr().err == ""


def test_ctrl_c_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(_func(KeyboardInterrupt()), "unetdist synth") == 130
    assert capsys.readouterr().err == "\nunetdist synth: interrupted\n"


def test_bugs_keep_their_traceback() -> None:
    """A plain ValueError or TypeError from our code is a bug: it propagates (Python prints the traceback)."""
    for exc in (ValueError("window rows (3, 2) outside [0, 2)"), TypeError("unsupported operand"), KeyError("x")):
        with pytest.raises(type(exc)):
            run_command(_func(exc), "unetdist predict")


def test_real_commands_exit_2_with_one_line(tmp_path: Path) -> None:
    """Through the real entry points: a config key typo and an unreadable image, each one line on stderr."""
    proc = run_cmd([PYTHON, "-m", "unetdist.train", "train.stepz=3"], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "unetdist train: unknown config key 'train.stepz'; did you mean 'train.steps'?"], proc.stderr
    (tmp_path / "img_0.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(tmp_path / "lbl_0.tif", np.zeros((32, 32), np.uint8))
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "shard", "--images", str(tmp_path / "img_*.tif"), "--labels",
                    str(tmp_path / "lbl_*.tif"), "--out", str(tmp_path / "shards")], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("unetdist shard: "), proc.stderr
    assert "img_0.tif" in lines[0] and "Traceback" not in proc.stderr


def test_progress_lines_outside_a_terminal(caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(np.arange(0.0, 1000.0, 2.0))  # every reading 2 s after the previous one
    monkeypatch.setattr("unetdist.data.progress.time.monotonic", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="unetdist.progress"):
        with Progress(10, "synth", "image", tty=False, interval_s=3.0) as progress:
            for _ in range(10):
                progress.update()
    lines = [r.getMessage() for r in caplog.records]
    # an update every 2 s, a line at most every 3 s: every other update, plus none at the end (already shown)
    assert len(lines) == 5 and all("\r" not in line for line in lines), lines
    assert lines[0] == "synth: image 2/10 (20%), 0.5 image/s, elapsed 4s, ETA 16s", lines
    assert lines[-1] == "synth: image 10/10 (100%), 0.5 image/s, elapsed 20s, ETA 0s", lines
    assert format_duration(3725) == "1:02:05" and format_duration(125) == "2:05"


def test_training_log_lines_show_step_of_total_and_eta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from unetdist.train.logging import RunLogger

    logger = RunLogger(tmp_path / "tb", total_steps=100, start_step=40)  # resumed at step 40
    assert logger.bar.bar is None, "a test's stderr is no terminal: log lines, not a bar"
    with caplog.at_level(logging.INFO, logger="unetdist.progress"):
        logger.progress(50, {"loss": 0.25, "lr": 0.001})
        logger.close()
    line = caplog.records[0].getMessage()
    assert re.fullmatch(r"train: step 50/100 \(50%\) loss=0\.25 lr=0\.001, [\d.e+]+ step/s, elapsed \S+, ETA \S+",
                        line), line


def _three_class_sample() -> torch.Tensor:
    label = torch.zeros(16, 16)
    label[4:12, 4:12] = 1  # boundary ring around an interior
    label[6:10, 6:10] = 2
    image = torch.linspace(0, 1, 256).reshape(16, 16)
    return torch.stack([image, label, label.flip(0)])


def test_image_grid_paints_every_class_in_its_own_colour(tmp_path: Path) -> None:
    from PIL import Image

    from unetdist.train.logging import prediction_grid, save_png

    sample = _three_class_sample()
    grid = prediction_grid([sample, sample], num_classes=3)
    assert grid.shape == (16 + 2 + 16, 3 * 16 + 4, 3) and grid.min() >= 0 and grid.max() <= 1
    target = grid[:16, 18:34]
    colours = {k: target[sample[1].numpy() == k] for k in range(3)}
    assert all(len(np.unique(c, axis=0)) == 1 for c in colours.values()), "one colour per class"
    seen = [tuple(c[0]) for c in colours.values()]
    assert len(set(seen)) == 3 and seen[0] == (0.0, 0.0, 0.0)
    for rgb in seen[1:]:
        assert max(rgb) - min(rgb) > 0.5, f"class colour {rgb} is close to grey, like the image"
    pred = grid[:16, 36:52]
    assert np.array_equal(pred[sample[2].numpy() == 2][0], target[sample[1].numpy() == 2][0])
    save_png(grid, tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "RGB"


def test_image_grid_picks_tiles_with_foreground() -> None:
    from unetdist.train.logging import GridSamples

    kept = GridSamples(keep=2)
    empty = torch.zeros(3, 8, 8, dtype=torch.long)
    full = torch.zeros(3, 8, 8, dtype=torch.long)
    full[1, 2:5, 2:5] = 1
    image = torch.arange(3.0)[:, None, None, None].expand(3, 1, 8, 8)
    kept.offer(image, empty, empty)  # a first batch of empty tiles
    assert not kept.full and [float(s[0, 0, 0]) for s in kept.samples()] == [0.0, 1.0]
    kept.offer(image, full, full)  # one tile with foreground (the second) comes first
    assert [float(s[0, 0, 0]) for s in kept.samples()] == [1.0, 0.0]


def test_synth_and_shard_report_progress_in_a_log(tmp_path: Path) -> None:
    """Outside a terminal (here a pipe) long commands log count, rate and ETA as whole lines."""
    raw = tmp_path / "raw"
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "synth", "--out", str(raw), "--count", "3", "--height", "64",
                    "--width", "64"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"INFO unetdist\.progress: synth: image 3/3 \(100%\), [\d.e+]+ image/s, elapsed \S+, ETA 0s",
                     proc.stderr), proc.stderr
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "shard", "--images", str(raw / "img_*.tif"), "--labels",
                    str(raw / "lbl_*.tif"), "--out", str(tmp_path / "shards"), "--tile", "32"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"shard: band 3/3 \(100%\), [\d.e+]+ band/s", proc.stderr), proc.stderr
    assert "\r" not in proc.stderr and "wrote" in proc.stdout
