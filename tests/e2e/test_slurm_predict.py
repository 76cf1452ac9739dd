"""`sbatch slurm/predict.sh` on a real private SLURM cluster: two nodes, one torchrun agent each, one image
split between the two ranks, which write disjoint chunks of the same OME-Zarr stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from tests.cluster.fixtures import slurm_cluster  # noqa: F401 (fixture)
from tests.cluster.slurm import PrivateSlurm
from tests.conftest import PYTHON, REPO
from unetdist.infer.model_file import model_file_state
from unetdist.model import UNet

pytestmark = pytest.mark.slow

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def test_sbatch_predicts_one_image_on_two_nodes(slurm_cluster: PrivateSlurm, tmp_path: Path) -> None:  # noqa: F811
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    stats = {"low": [0.0], "high": [3000.0], "clipped_mean": [1500.0], "clipped_std": [800.0]}
    torch.save(model_file_state(UNet(in_channels=1, num_classes=2, base_width=4, depth=2), stats), model)
    image = np.random.default_rng(0).integers(0, 3000, (256, 96)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "slide.ome.tif", image, tile=(32, 32), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    out = tmp_path / "pred"
    job = slurm_cluster.sbatch(
        ["--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10",
         f"--output={tmp_path}/%x-%j.out", f"--error={tmp_path}/%x-%j.err",
         "slurm/predict.sh", "--model", str(model), "--images", str(tmp_path / "slide.ome.tif"), "--out", str(out),
         "--tile", "32", "--overlap", "8", "--chunk", "32", "--format", "zarr"],
        cwd=REPO, env={"PYTHON": PYTHON, "OMP_NUM_THREADS": "1"},
    )
    info = slurm_cluster.wait_job(job, DONE, 240)
    log = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"*-{job}.*")))
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    assert f"--rdzv_id={job}" in log and "--nnodes=2" in log
    summary = json.loads((out / "predict.json").read_text())
    assert summary["world_size"] == 2 and summary["files"][0]["ranks"] == [0, 1], "both nodes predicted rows"
    labels = zarr.open_group(out / "slide_labels.zarr", mode="r")
    assert labels["0"].shape == (256, 96) and labels.attrs["multiscales"][0]["datasets"][0][
        "coordinateTransformations"][0]["scale"] == [0.5, 0.5]
