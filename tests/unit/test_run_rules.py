"""Runs that do what was asked: settings fingerprints, the run-folder lock, stop signals, shapes refused up front."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO
from unetdist.config import ConfigError, load_config, to_dict
from unetdist.train.fingerprint import check_resume, current, fingerprint
from unetdist.train.preemption import Preempted, StopSignal
from unetdist.train.runlock import RunLock

DATA = {"root": "data/x", "tile": 32, "train_samples": 24, "val_samples": 8, "channels": 1, "num_classes": 2,
        "dataset": "synth"}
BASE = ["model.base_width=4", "model.depth=2", "data.shard.tile=32", "train.steps=100"]


def _state(step: int = 50, *overrides: str, data: dict | None = None, world_size: int = 2) -> dict:
    cfg = load_config(None, [*BASE, *overrides])
    return {"step": step, "fingerprint": current(cfg, data or DATA, world_size)}


def test_same_settings_resume_and_other_process_counts_are_not_a_change() -> None:
    check_resume(_state(), Path("ck.pt"), load_config(None, BASE + ["run.dir=elsewhere", "run.stop_at=60"]), DATA, 2)
    # the same global batch on another number of ranks continues the same run (elastic resume)
    check_resume(_state(), Path("ck.pt"), load_config(None, BASE + ["data.batch_size=16"]), DATA, 1)


def test_a_changed_global_batch_needs_force() -> None:
    with pytest.raises(ConfigError, match=r"global batch \(data.batch_size x ranks\): 16 -> 8"):
        check_resume(_state(), Path("ck.pt"), load_config(None, BASE), DATA, 1)


def test_changed_model_is_refused_naming_the_keys_even_with_force() -> None:
    for resume in ("auto", "force"):
        cfg = load_config(None, BASE + ["model.base_width=8", "model.norm=group", f"run.resume={resume}"])
        with pytest.raises(ConfigError, match=r"another model \(model.base_width: 4 -> 8; model.norm: 'batch' -> "
                                              r"'group'\)") as err:
            check_resume(_state(), Path("ck.pt"), cfg, DATA, 2)
        assert "\n" not in str(err.value) and "new run.dir" in str(err.value)


@pytest.mark.parametrize("change, data, named", [
    (["train.lr=0.01"], DATA, "train.lr: 0.001 -> 0.01"),
    (["train.steps=200"], DATA, "train.steps: 100 -> 200"),
    (["data.batch_size=4"], DATA, "global batch (data.batch_size x ranks): 16 -> 8"),
    ([], {**DATA, "root": "data/y"}, "data.root"),
    ([], {**DATA, "tile": 64}, "dataset tile: 32 -> 64"),
    ([], {**DATA, "train_samples": 30}, "dataset train_samples: 24 -> 30"),
])
def test_changed_data_or_schedule_needs_force(change: list[str], data: dict, named: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="run.resume=force") as err:
        check_resume(_state(), Path("ck.pt"), load_config(None, BASE + change), data, 2)
    assert named in str(err.value)
    check_resume(_state(), Path("ck.pt"), load_config(None, BASE + change + ["run.resume=force"]), data, 2)
    assert named in caplog.text  # continuing says what changed


def test_checkpoint_past_train_steps_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"at step 150, past train.steps=100"):
        check_resume(_state(150), Path("ck.pt"), load_config(None, BASE + ["run.resume=force"]), DATA, 2)
    check_resume(_state(100), Path("ck.pt"), load_config(None, BASE), DATA, 2)  # finished: reports again


def test_checkpoints_without_a_fingerprint_are_checked_from_their_saved_config() -> None:
    old = {"step": 5, "config": to_dict(load_config(None, BASE)), "data": DATA, "world_size": 2}
    assert fingerprint(old["config"], DATA, 2) == current(load_config(None, BASE), DATA, 2)
    with pytest.raises(ConfigError, match="model.depth: 2 -> 3"):
        check_resume(old, Path("ck.pt"), load_config(None, [*BASE, "model.depth=3"]), DATA, 2)


@pytest.mark.slow
def test_second_run_on_a_locked_folder_fails_naming_the_holder(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        code = ("import sys; from pathlib import Path; from unetdist.train.runlock import RunLock\n"
                "try: RunLock(Path(sys.argv[1])).acquire()\nexcept Exception as e: print(e); sys.exit(2)")
        proc = subprocess.run([PYTHON, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stdout and "in use by another run" in proc.stdout
    finally:
        lock.release()
    proc = subprocess.run([PYTHON, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # released: the next run gets it


def test_sigint_is_a_stop_and_a_second_one_later_aborts() -> None:
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded by torchrun's agent: not an abort
        assert stop.received == signal.SIGINT
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.restore()
    assert Preempted(3, signal.SIGINT).exit_code == 130 and Preempted(3, signal.SIGTERM).exit_code == 143
    assert Preempted(3, signal.SIGUSR1).exit_code == 75


@pytest.mark.slow
def test_sigterm_watchdog_ends_a_process_stuck_after_the_signal() -> None:
    """A survivor of a broken group, blocked forever (here: asleep), still exits 143 after the grace time."""
    code = ("import os, signal, time\nfrom unetdist.train.preemption import StopSignal\n"
            "s = StopSignal(grace_s=0.5)\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(60)")
    start = time.monotonic()
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=50)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert time.monotonic() - start < 40 and "not done after" in proc.stderr


@pytest.mark.parametrize("overrides, named", [
    (["data.shard.tile=8", "model.depth=4"], "data.shard.tile=8 is too small for model.depth=4"),
    (["data.augment.crop=16", "model.depth=5"], "data.augment.crop=16 is too small for model.depth=5"),
    (["data.batch_size=2", "train.grad_accum=2", "data.shard.tile=16", "model.depth=4"], "a micro-batch of 1"),
    (["model.norm=instance", "data.shard.tile=16", "model.depth=4"], "1x1 bottleneck"),
])
def test_shapes_the_unet_cannot_train_are_refused_by_the_config(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)
