"""Real commands end to end: train a checkpoint, `torchrun ... predict` on 2 processes, `unetdist evaluate`.

(`python -m unetdist.infer` is the same parser as `unetdist predict|evaluate` with fewer imports; the
error test goes through `python -m unetdist.cli`, the `unetdist` console script's entry.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.conftest import PYTHON, REPO, free_port, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
WINDOWS = ["--tile", "64", "--overlap", "16"]


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_predict_on_two_processes_then_evaluate(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    _ok(run_cmd([PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
                 *tiny_overrides(run_dir, tiny_data), "data.workers=0", "train.steps=4", "train.val_every=4",
                 "train.ckpt_every=4"],
                env=ONE_THREAD))
    raw = tiny_data / "raw"
    images, labels = sorted(raw.glob("img_*.tif")), sorted(raw.glob("lbl_*.tif"))

    two = tmp_path / "two"
    log = _ok(run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                       "-m", "unetdist.infer", "predict", "--model", str(run_dir), "--images", str(raw / "img_*.tif"),
                       "--out", str(two),
                       "--instances", "--probabilities", *WINDOWS], env=ONE_THREAD))
    assert "predict, rank 0 of 2: window " in log and "(100%)" in log and "ETA" in log, log[-3000:]
    assert "rank 1 of 2" not in log and "\r" not in log, "one progress, on rank 0, as log lines (no bar in a pipe)"
    summary = json.loads((two / "predict.json").read_text())
    assert summary["world_size"] == 2 and summary["model"]["step"] == 4 and summary["megapixels_per_s"] > 0
    assert {f["owner"] for f in summary["files"]} == {0, 1}
    for image in images:
        shape = tifffile.imread(image).shape
        assert tifffile.imread(two / f"{image.stem}_labels.tif").shape == shape
        assert tifffile.imread(two / f"{image.stem}_probs.tif").shape == (2, *shape)
        assert tifffile.imread(two / f"{image.stem}_instances.tif").shape == shape

    scored = tmp_path / "scored"  # predict on 1 process and score, in one command
    out = _ok(run_cmd([PYTHON, "-m", "unetdist.infer", "evaluate", "--model", str(run_dir), "--images",
                       str(raw / "img_*.tif"), "--labels", str(raw / "lbl_*.tif"), "--overlays", "2", "--out", str(scored),
                       *WINDOWS], env=ONE_THREAD))
    assert "pooled over 6 image(s)" in out
    metrics = json.loads((scored / "metrics.json").read_text())
    assert len(metrics["images"]) == len(labels) == 6 and metrics["num_classes"] == 2
    assert 0.0 <= metrics["pooled"]["dice"]["foreground"] <= 1.0 and metrics["prediction"]["megapixels_per_s"] > 0
    assert (scored / "metrics.md").is_file() and (scored / "metrics.csv").is_file()
    assert len(list((scored / "overlays").glob("*.png"))) == 2
    for image in images:  # 1 process (evaluate's own prediction) and 2 processes agree
        assert np.array_equal(tifffile.imread(scored / "predictions" / f"{image.stem}_labels.tif"),
                              tifffile.imread(two / f"{image.stem}_labels.tif"))


def test_clear_error_names_the_file(tmp_path: Path) -> None:
    """The CLI path of a model-file error (the other errors are unit-tested in test_infer_model_file)."""
    model = tmp_path / "other.pt"
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 2, 1))
    torch.save({"model": other.state_dict(), "model_hparams": {"in_channels": 1, "num_classes": 2},
                "data": {"stats": {"low": [0], "high": [1], "clipped_mean": [0], "clipped_std": [1]}}}, model)
    image = tmp_path / "img.tif"
    tifffile.imwrite(image, np.zeros((20, 20), np.uint16))
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "predict", "--model", str(model), "--images", str(image),
                    "--out", str(tmp_path / "o")])
    assert proc.returncode == 2 and f"unetdist predict: {model}" in proc.stderr and "another architecture" in proc.stderr
