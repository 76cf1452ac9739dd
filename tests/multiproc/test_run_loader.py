"""One training loader for the whole run: the per-epoch loaders' batches, from worker processes started once.

Training used to build a DataLoader per epoch, so every epoch restarted every worker process and
refilled its shuffle blocks from cold. `run_loader` must give exactly the batches of those
per-epoch loaders laid end to end (keys, pixels, skip counts, on damaged shards too), also when a
run resumes mid-epoch, while its 2 workers are started once for 3 epochs.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.multiproc.test_stream_robust import damaged_copy, dataset  # noqa: F401 (a fixture)
from unetdist.config import AugmentConfig, DataConfig
from unetdist.data.stream import batches_per_epoch, open_manifest, run_loader, train_loader

EPOCHS, WORLD, RANK = 3, 2, 1


def _config() -> DataConfig:
    return DataConfig(batch_size=2, workers=2, shuffle_buffer=8, augment=AugmentConfig())


def _record_start(folder: Path, worker: int) -> None:
    """worker_init_fn: one file per worker process start."""
    (folder / f"worker{worker}-pid{os.getpid()}").touch()


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for n, (x, y) in enumerate(zip(a, b)):
        assert x["key"] == y["key"], f"batch {n}"
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]), f"batch {n}"
        assert int(x["skipped"]) == int(y["skipped"]), f"batch {n}"


@pytest.mark.parametrize("resume", [None, 0, 3])  # a fresh run; resumed in epoch 2 at its batch 0, at its batch 3
def test_one_loader_gives_the_per_epoch_batches_from_workers_started_once(
    tiny_data: Path, tmp_path: Path, resume: int | None
) -> None:
    data, manifest = _config(), open_manifest(tiny_data)
    per_epoch = batches_per_epoch(data, manifest, WORLD)
    assert per_epoch >= 5  # several batches per worker per epoch, so workers outlive a boundary mid-stream
    start = 0 if resume is None else per_epoch + resume
    expected = [b for epoch in range(EPOCHS)
                for b in train_loader(data, manifest, rank=RANK, world_size=WORLD, seed=7, epoch=epoch)][start:]

    loader = run_loader(data, manifest, rank=RANK, world_size=WORLD, seed=7, start_step=start,
                        stop_step=EPOCHS * per_epoch)
    assert len(loader) == EPOCHS * per_epoch - start  # type: ignore[arg-type]
    loader.worker_init_fn = partial(_record_start, tmp_path)  # type: ignore[attr-defined]
    _same(list(loader), expected)
    starts = sorted(p.name for p in tmp_path.iterdir())
    assert [name.split("-")[0] for name in starts] == ["worker0", "worker1"], starts  # once for 3 epochs


def test_stop_step_ends_the_stream_mid_epoch(tiny_data: Path) -> None:
    data, manifest = _config(), open_manifest(tiny_data)
    per_epoch = batches_per_epoch(data, manifest, WORLD)
    whole = list(train_loader(data, manifest, rank=RANK, world_size=WORLD, seed=7, epoch=1))
    part = list(run_loader(data, manifest, rank=RANK, world_size=WORLD, seed=7, start_step=per_epoch + 1,
                           stop_step=per_epoch + 3))
    _same(part, whole[1:3])
    assert list(run_loader(data, manifest, rank=RANK, world_size=WORLD, seed=7, start_step=5, stop_step=5)) == []
    with pytest.raises(ValueError, match="start_step"):
        run_loader(data, manifest, rank=RANK, world_size=WORLD, seed=7, start_step=6, stop_step=5)


def test_damaged_samples_are_replaced_and_counted_as_the_per_epoch_loaders_do(
    dataset: Path, tmp_path: Path
) -> None:
    damaged_copy(dataset, tmp_path / "damaged")
    data, manifest = DataConfig(batch_size=2, workers=2, shuffle_buffer=4), open_manifest(tmp_path / "damaged")
    per_epoch = batches_per_epoch(data, manifest, 1)
    start = per_epoch + 1  # each worker's first batch has good samples (else it fails, as a per-epoch loader does)
    expected = [b for epoch in range(EPOCHS)
                for b in train_loader(data, manifest, rank=0, world_size=1, seed=3, epoch=epoch)][start:]
    got = list(run_loader(data, manifest, rank=0, world_size=1, seed=3, start_step=start,
                          stop_step=EPOCHS * per_epoch))
    _same(got, expected)
    assert sum(int(b["skipped"]) for b in got) > 0
