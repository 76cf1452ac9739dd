"""model.in_channels / model.num_classes come from the dataset unless stated; stated values are still checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow


def test_a_three_class_dataset_trains_a_three_class_model_without_saying_so(tmp_path: Path) -> None:
    run_dir, data = tmp_path / "run", tmp_path / "data"
    base = [*tiny_overrides(run_dir, data), "data.synth.boundary=true", "data.workers=0", "train.steps=2",
            "train.val_every=2", "train.ckpt_every=2", "train.log_every=1"]
    proc = run_cmd([PYTHON, "-m", "unetdist.train", *base], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(next((run_dir / "checkpoints").glob("step_*.pt")), map_location="cpu", weights_only=True)
    assert state["model_hparams"]["num_classes"] == 3 and state["model_hparams"]["in_channels"] == 1
    assert "num_classes: 3" in (run_dir / "config.yaml").read_text()  # the resolved value is what the run saved
    proc = run_cmd([PYTHON, "-m", "unetdist.train", *base, f"run.dir={tmp_path / 'other'}", "model.num_classes=2"])
    assert proc.returncode != 0
    assert f"data in {data} has 3 classes but model.num_classes=2; set model.num_classes=3" in proc.stderr
