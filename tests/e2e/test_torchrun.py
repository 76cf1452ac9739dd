"""A real `torchrun --nproc_per_node=2` run on synthetic shards, read back from its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import PYTHON, REPO, free_port, run_cmd, tiny_overrides
from tests.e2e.tb import image_tags, read_scalars

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_train_validate_checkpoint_log(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
        *tiny_overrides(run_dir, tiny_data),
        "train.steps=8", "train.val_every=4", "train.ckpt_every=4", "train.log_every=2",
    ]
    proc = run_cmd(cmd, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (run_dir / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_000000004.pt", "step_000000008.pt"]
    state = torch.load(run_dir / "checkpoints" / ckpts[-1], weights_only=True)
    assert state["step"] == 8 and state["world_size"] == 2 and len(state["rng"]) == 2

    scalars = read_scalars(run_dir / "tb")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/megapixels_per_s",
                "train/images_per_s_per_device", "train/megapixels_per_s_per_device", "train/data_wait_fraction",
                "train/peak_memory_gb", "train/mfu", "train/data_skipped", "val/dice/class_1", "val/iou/class_1", "val/dice/foreground", "val/loss"):
        assert tag in scalars, f"missing TensorBoard tag {tag}; have {sorted(scalars)}"
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8]
    assert [s for s, _ in scalars["val/dice/foreground"]] == [4, 8]
    assert all(v > 0 for _, v in scalars["train/images_per_s"])
    assert image_tags(run_dir / "tb") == ["val/input_target_prediction"]
    # global images/s is the per-device figure times the world size
    g, d = scalars["train/images_per_s"][-1][1], scalars["train/images_per_s_per_device"][-1][1]
    assert g == pytest.approx(2 * d, rel=1e-4)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 8 and 0.0 <= metrics["dice/foreground"] <= 1.0
    assert (run_dir / "predictions.png").is_file()
    picture = np.asarray(Image.open(run_dir / "predictions.png"))
    assert picture.ndim == 3 and picture.shape[2] == 3, "classes in colour"
    # progress as log lines in a pipe: step N/total and an ETA, once (rank 0), no carriage returns
    steps = [line for line in proc.stderr.splitlines() if "train: step " in line]
    assert len(steps) == 4 and "train: step 8/8 (100%)" in steps[-1] and "ETA" in steps[0], proc.stderr[-3000:]
    assert all("[rank 0]" in line for line in steps) and "\r" not in proc.stderr
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1, "only rank 0 writes TensorBoard"
