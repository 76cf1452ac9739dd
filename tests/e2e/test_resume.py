"""Stopping at step 6 and resuming to 12 gives the same loss at every step as 12 unbroken steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, run_cmd, tiny_overrides
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow


def _train(run_dir: Path, data: Path, *extra: str) -> None:
    cmd = [PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
           *tiny_overrides(run_dir, data), "train.steps=12", "train.log_every=1", "train.val_every=0",
           "train.ckpt_every=0", *extra]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_resume_reproduces_the_unbroken_loss_curve(tmp_path: Path, tiny_data: Path) -> None:
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    _train(unbroken, tiny_data)
    _train(resumed, tiny_data, "run.stop_at=6")
    assert [p.name for p in (resumed / "checkpoints").glob("*.pt")] == ["step_000000006.pt"]
    assert not (resumed / "metrics.json").exists()
    _train(resumed, tiny_data)

    a = read_scalars(unbroken / "tb")["train/loss"]
    b = read_scalars(resumed / "tb")["train/loss"]
    assert [s for s, _ in a] == list(range(1, 13))
    assert [s for s, _ in b] == list(range(1, 13)), "resumed curve has gaps or repeats"
    for (step, va), (_, vb) in zip(a, b):
        assert vb == pytest.approx(va, abs=1e-6, rel=1e-6), f"step {step}: {va} vs {vb}"
    assert a[-1][1] != a[0][1]
