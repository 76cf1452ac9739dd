"""A prediction killed half-way (SIGKILL, no chance to clean up) continues from the units already written,
and ends with the same files as an unbroken run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from tests.conftest import PYTHON, REPO, run_cmd
from unetdist.infer.model_file import model_file_state
from unetdist.model import UNet

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FLAGS = ["--tile", "32", "--overlap", "8", "--chunk", "32", "--format", "zarr", "--probabilities", "--instances"]


def _command(model: Path, image: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "unetdist.infer", "predict", str(model), str(image), "--out", str(out), *FLAGS]


def test_kill_and_resume_equals_unbroken(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    stats = {"low": [0.0], "high": [3000.0], "clipped_mean": [1500.0], "clipped_std": [800.0]}
    torch.save(model_file_state(UNet(in_channels=1, num_classes=3, base_width=4, depth=2), stats), model)
    image = tmp_path / "tall.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 3000, (1600, 96)).astype(np.uint16), tile=(32, 32))
    out = tmp_path / "resumed"
    done = out / ".tall.predicting" / "done"
    proc = subprocess.Popen(_command(model, image, out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (done.is_dir() and len(list(done.iterdir())) >= 5) and proc.poll() is None:
        assert time.monotonic() < deadline, "no unit finished within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(done.iterdir()))
    assert 5 <= finished < 50, f"killed after {finished} of 50 units: the test must kill it half-way"

    other = run_cmd([*_command(model, image, out), "--tile", "64"], env={"OMP_NUM_THREADS": "1"})
    assert other.returncode == 2 and "holds a partial prediction with other settings" in other.stderr
    assert len(list(done.iterdir())) == finished, "a refused run leaves the partial work alone"
    resumed = run_cmd(_command(model, image, out), env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing a partial prediction, {finished} of 50 units already done" in resumed.stderr
    unbroken = run_cmd(_command(model, image, tmp_path / "unbroken"), env={"OMP_NUM_THREADS": "1"})
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    for kind in ("labels", "probs", "instances"):
        a = zarr.open_group(out / f"tall_{kind}.zarr", mode="r")
        b = zarr.open_group(tmp_path / "unbroken" / f"tall_{kind}.zarr", mode="r")
        assert sorted(a.array_keys()) == sorted(b.array_keys())
        for level in a.array_keys():
            assert np.array_equal(a[level][:], b[level][:]), f"{kind} level {level}"
    assert not (out / ".tall.predicting").exists(), "the work folder is removed when done"
