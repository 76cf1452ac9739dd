"""SIGUSR1 (SLURM's warning before a time limit): finish the step, checkpoint, exit 75, resume seamlessly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, run_cmd, tiny_overrides
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow

STEPS = 80


def _cmd(run_dir: Path, data: Path) -> list[str]:
    return [PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
            *tiny_overrides(run_dir, data), f"train.steps={STEPS}", "train.log_every=1", "train.val_every=0",
            "train.ckpt_every=0", "data.workers=0"]


def test_signal_checkpoints_exits_resumable_and_resume_continues(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run_dir, tiny_data), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if " step 10/" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 75, output[-3000:]
    ckpts = list((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1, output[-2000:]
    stopped_at = int(ckpts[0].stem.split("_")[1])
    assert 10 <= stopped_at < STEPS
    assert "resumable" in output

    resumed = run_cmd(_cmd(run_dir, tiny_data))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [s for s, _ in read_scalars(run_dir / "tb")["train/loss"]]
    assert steps == list(range(1, STEPS + 1)), "the loss curve has a gap or a repeat across the stop"
