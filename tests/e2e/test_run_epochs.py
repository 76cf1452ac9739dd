"""A run over three epochs, stopped and resumed inside the second, logs the right epoch at every step.

Training reads all epochs through one loader (`unetdist.data.stream.run_loader`), so the loop no
longer knows the epoch from the loader it built; `train/epoch` must still be the epoch of the batch
each step trained on, after a resume too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, run_cmd, tiny_overrides
from tests.e2e.tb import read_scalars
from unetdist.config import DataConfig
from unetdist.data.stream import batches_per_epoch, open_manifest

pytestmark = pytest.mark.slow


def _train(run_dir: Path, data: Path, *extra: str) -> None:
    cmd = [PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
           *tiny_overrides(run_dir, data), "data.batch_size=8", "train.log_every=1", "train.val_every=0",
           "train.ckpt_every=0", *extra]
    proc = run_cmd(cmd, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_epoch_logged_per_step_across_epochs_and_a_resume(tmp_path: Path, tiny_data: Path) -> None:
    per_epoch = batches_per_epoch(DataConfig(batch_size=8), open_manifest(tiny_data), 1)
    steps = 2 * per_epoch + 1  # into the third epoch
    _train(tmp_path, tiny_data, f"train.steps={steps}", f"run.stop_at={per_epoch + 2}")
    _train(tmp_path, tiny_data, f"train.steps={steps}")
    scalars = read_scalars(tmp_path / "tb")
    epochs = scalars["train/epoch"]
    assert [s for s, _ in epochs] == list(range(1, steps + 1))
    assert [int(v) for _, v in epochs] == [(s - 1) // per_epoch for s in range(1, steps + 1)]
    assert all(v == 0 for _, v in scalars["train/data_skipped"])
