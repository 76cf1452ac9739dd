"""A training run on damaged shards completes, and the skipped data is logged."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.conftest import PYTHON, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow


def test_training_survives_truncated_and_flipped_shards(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shards = sorted(data.glob("train-*.tar"))
    assert len(shards) >= 8
    for shard in shards[:3]:  # a few shards: one flipped byte in the pixels of their first sample
        with tarfile.open(shard) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".img.npy")]
        raw = bytearray(shard.read_bytes())
        raw[members[0].offset_data + 150] ^= 0xFF
        shard.write_bytes(bytes(raw))
    for shard in shards[3:6]:  # a few more cut inside a member
        with tarfile.open(shard) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".lbl.npy")]
        shard.write_bytes(shard.read_bytes()[: members[-1].offset_data + 40])
    overrides = tiny_overrides(tmp_path / "run", data) + ["data.generate=false", "train.steps=12",
                                                         "train.val_every=12", "train.ckpt_every=12"]
    proc = run_cmd([PYTHON, "-m", "unetdist.train", *overrides], timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 12
    warnings = [line for line in proc.stderr.splitlines() if "training data: skipped" in line]
    assert any("fails its CRC-32 check" in line for line in warnings), proc.stderr[-3000:]
    assert any("unreadable" in line and "unexpected end of data" in line for line in warnings), proc.stderr[-3000:]
    assert any("(1 skipped so far" in line for line in warnings)
    from tests.e2e.tb import read_scalars

    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["train/data_skipped"][-1][1] >= 3, "the skipped samples are not counted in TensorBoard"
    assert [v for _, v in scalars["train/data_skipped"]] == sorted(v for _, v in scalars["train/data_skipped"])
