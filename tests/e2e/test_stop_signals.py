"""Real runs and real signals: one run per folder, SIGTERM and SIGINT stop with a checkpoint (143, 130), a
changed model is refused without a traceback, and torchrun's SIGTERM to the survivor of a broken group
never leaves it hanging until torchrun's SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.procs import descendants, kill_tree
from tests.conftest import PYTHON, REPO, free_port, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
STEP = re.compile(r"\bstep (\d+)\b")


def _args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/default.yaml"), *tiny_overrides(run_dir, data), "train.steps=2000",
            "train.log_every=1", "train.val_every=0", "train.ckpt_every=0", "data.workers=0", *extra]


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _until_step(proc: subprocess.Popen, step: int) -> str:
    """Read output until a log line reports `step` or later (the pipe is drained later by communicate)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        found = STEP.search(line)
        if found and int(found.group(1)) >= step:
            return "".join(seen)
    raise AssertionError("".join(seen)[-3000:])


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))


def test_lock_sigterm_sigint_and_a_changed_model(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    train = [PYTHON, "-m", "unetdist.train"]
    first = _start([*train, *_args(run_dir, tiny_data)])
    try:
        head = _until_step(first, 3)
        second = run_cmd([*train, *_args(run_dir, tiny_data)])
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "in use by another run" in second.stderr
        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=120)
    finally:
        kill_tree(first.pid)
    assert first.returncode == 143, (head + rest)[-3000:]
    assert "stopped by SIGTERM" in rest and len(_checkpoint_steps(run_dir)) == 1
    stopped = _checkpoint_steps(run_dir)[0]

    third = _start([*train, *_args(run_dir, tiny_data)])
    try:
        head = _until_step(third, stopped + 2)
        third.send_signal(signal.SIGINT)
        rest, _ = third.communicate(timeout=120)
    finally:
        kill_tree(third.pid)
    assert third.returncode == 130, (head + rest)[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in head and _checkpoint_steps(run_dir)[-1] > stopped + 1

    wider = run_cmd([*train, *_args(run_dir, tiny_data, "model.base_width=8")])
    assert wider.returncode == 2 and "model.base_width: 4 -> 8" in wider.stderr, wider.stderr[-3000:]
    assert "Traceback" not in wider.stderr


def test_settings_that_cannot_work_are_refused_before_data_is_read(tmp_path: Path, tiny_data: Path) -> None:
    train = [PYTHON, "-m", "unetdist.train"]
    other_tile = run_cmd([*train, *_args(tmp_path / "a", tiny_data, "data.shard.tile=64")])
    assert other_tile.returncode == 2, other_tile.stderr[-3000:]
    assert f"data.shard.tile=64 but the dataset in {tiny_data} was cut into 32-px tiles" in other_tile.stderr
    fresh = tmp_path / "never-made"  # data.generate=true would make it: the shape check must come first
    small = run_cmd([*train, *_args(tmp_path / "b", fresh, "data.shard.tile=16", "model.depth=5")])
    assert small.returncode == 2 and "data.shard.tile=16 is too small for model.depth=5" in small.stderr
    assert not fresh.exists() and not (tmp_path / "b").exists()


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_survivor_of_a_broken_group_exits_before_torchrun_kills_it(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    agent = _start([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    "--max-restarts=0", "-m", "unetdist.train", *_args(run_dir, tiny_data)])
    try:
        head = _until_step(agent, 3)
        victim = next(p for p in descendants(agent.pid) if _rank_of(p) == 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = agent.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        kill_tree(agent.pid)
    output = head + rest
    assert agent.returncode != 0 and "closing signal SIGTERM" in output, output[-3000:]
    assert "Unable to shutdown process" not in output, "the survivor hung until torchrun's SIGKILL"
    assert took < 30, output[-3000:]
