"""The embedded default run, exactly as the README's first command runs it, must learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, run_cmd
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow


def test_default_run_reaches_dice_target(tmp_path: Path) -> None:
    run_dir, data = tmp_path / "run", tmp_path / "data"
    cmd = [PYTHON, "-m", "unetdist.cli", "train", "--config", str(REPO / "configs/default.yaml"),
           f"run.dir={run_dir}", f"data.root={data}", "data.generate=true"]  # asked for: not the shipped root
    proc = run_cmd(cmd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dice/foreground"] >= 0.85, metrics
    loss = read_scalars(run_dir / "tb")["train/loss"]
    assert loss[-1][1] < 0.5 * loss[0][1]
    assert (run_dir / "predictions.png").is_file()
