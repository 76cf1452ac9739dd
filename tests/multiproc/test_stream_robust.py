"""The loaders on damaged shards (skipped, counted, training goes on), weight maps, and URL forms.

Damage is real: a tar truncated in the middle of a member, and one flipped byte inside a member's
data (which only the stored CRC-32 can notice). DataLoader workers are real processes.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cluster.faulty_http import Plan, serve
from unetdist.config import AugmentConfig, DataConfig, NormalizeConfig, ShardConfig
from unetdist.data.errors import DataError
from unetdist.data.manifest import normalize, open_manifest
from unetdist.data.shards import write_shards
from unetdist.data.stream import batches_per_epoch, train_loader, val_loader
from unetdist.data.synth import synth_image

TILE = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic images of 32 x 32 with instance labels -> 4 tiles each, 5 tiles per shard, weight maps."""
    base = tmp_path_factory.mktemp("robust")
    pairs = []
    for i in range(6):
        image, instances = synth_image(seed=2, index=i, height=32, width=32)
        np.save(base / f"img{i}.npy", image)
        np.save(base / f"inst{i}.npy", instances)
        pairs.append((base / f"img{i}.npy", base / f"inst{i}.npy"))
    cfg = ShardConfig(tile=TILE, val_fraction=0.5, seed=0, labels="instances", weight_map=True, min_shards=2)
    manifest = write_shards(pairs, base / "clean", cfg, num_classes=3)
    assert [s["samples"] for s in manifest["val"]["shards"]] == [6, 6]
    return base / "clean"


def damaged_copy(clean: Path, out: Path) -> dict[str, int]:
    """Copy the dataset, flip one byte in a sample's image data and cut a shard mid-member.

    Returns how many validation samples each kind of damage removes.
    """
    shutil.copytree(clean, out)
    with tarfile.open(out / "val-000000.tar") as tar:
        members = tar.getmembers()
    image_member = [m for m in members if m.name.endswith(".img.npy")][2]  # the 3rd sample
    data = bytearray((out / "val-000000.tar").read_bytes())
    data[image_member.offset_data + 200] ^= 0xFF  # inside the pixels, after the .npy header
    (out / "val-000000.tar").write_bytes(bytes(data))
    with tarfile.open(out / "val-000001.tar") as tar:
        members = tar.getmembers()
    cut = [m for m in members if m.name.endswith(".lbl.npy")][3]  # in the 4th sample's label
    shard = out / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[: cut.offset_data + 50])
    for train_shard in sorted(out.glob("train-*.tar")):  # and the same two kinds of damage in training
        data = bytearray(train_shard.read_bytes())
        data[len(data) // 3] ^= 0xFF
        train_shard.write_bytes(bytes(data[: len(data) * 2 // 3]))
    return {"flipped": 1, "truncated": 6 - 3}


def test_damaged_shards_are_skipped_counted_and_training_goes_on(dataset: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    lost = damaged_copy(dataset, tmp_path / "damaged")
    manifest = open_manifest(tmp_path / "damaged")
    data = DataConfig(batch_size=2, workers=0, shuffle_buffer=4, augment=AugmentConfig())
    with caplog.at_level("WARNING"):
        batches = list(val_loader(data, manifest, rank=0, world_size=1))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 12 - lost["flipped"] - lost["truncated"]
    assert sum(int(b["skipped"]) for b in batches) == 2  # one bad sample, one broken shard
    assert any("CRC-32" in r.getMessage() for r in caplog.records)
    assert any("val-000001.tar" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    for epoch in range(2):  # training: every batch still comes, full-sized
        train = list(train_loader(data, manifest, rank=0, world_size=1, seed=0, epoch=epoch))
        assert len(train) == batches_per_epoch(data, manifest, 1)
        assert all(b["image"].shape == (2, 1, TILE, TILE) for b in train)
    clean = list(train_loader(data, open_manifest(dataset), rank=0, world_size=1, seed=0, epoch=0))
    assert sum(int(b["skipped"]) for b in clean) == 0


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size", [1, 2])
def test_workers_and_ranks_report_each_skip_once(dataset: Path, tmp_path: Path, world_size: int) -> None:
    damaged_copy(dataset, tmp_path / "damaged")
    manifest = open_manifest(tmp_path / "damaged")
    data = DataConfig(batch_size=2, workers=2, shuffle_buffer=4)  # 2 ranks x 2 workers share 2 val shards
    batches = [b for rank in range(world_size) for b in val_loader(data, manifest, rank=rank, world_size=world_size)]
    assert sum(int(b["skipped"]) for b in batches) == 2 and sum(len(b["key"]) for b in batches) == 8


def test_weight_maps_come_with_batches_and_move_with_the_tiles(dataset: Path) -> None:
    manifest = open_manifest(dataset)
    assert manifest.weights
    data = DataConfig(batch_size=3, workers=0, shuffle_buffer=4, normalize=NormalizeConfig(mode="dataset"))
    raw = {}
    from unetdist.data.reader import decode, shard_samples

    for url in manifest.train_shards:
        for sample in shard_samples(url):
            raw[sample["__key__"]] = decode(sample, 3)
    codes = set()
    for batch in train_loader(data, manifest, rank=0, world_size=1, seed=1, epoch=0):
        assert batch["weight"].dtype == torch.float32 and batch["weight"].shape == (3, TILE, TILE)
        for key, image, label, weight in zip(batch["key"], batch["image"].numpy(), batch["label"].numpy(),
                                             batch["weight"].numpy()):
            stored_image, stored_label, stored_weight = raw[key]
            found = [c for c in range(8) if np.array_equal(label, _d4(stored_label, c))
                     and np.array_equal(weight, _d4(stored_weight, c))
                     and np.array_equal(image, _d4(normalize(stored_image, manifest.stats), c))]
            assert found, key
            codes.add(found[0])
    assert len(codes) > 1
    val = next(iter(val_loader(data, manifest, rank=0, world_size=1)))
    assert "weight" in val and val["weight"].shape[1:] == (TILE, TILE)


def _d4(array: np.ndarray, code: int) -> np.ndarray:
    out = np.rot90(array, code % 4, axes=(-2, -1))
    return out[..., ::-1] if code >= 4 else out


@pytest.fixture()
def http_root(dataset: Path) -> Iterator[str]:
    with serve(Plan(dataset, ranges=False)) as url:  # a plain file server, as Python's http.server
        yield url


def test_http_manifest_and_shards(http_root: str, dataset: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("WebDataset reads http(s) shards with curl, which this machine lacks")
    data = DataConfig(batch_size=2, workers=0, shuffle_buffer=4)
    manifest = open_manifest(http_root, data)  # manifest.json over http, shard names resolved against the root
    assert manifest.val_shards[0].startswith("http://")
    keys = [k for b in val_loader(data, manifest, rank=0, world_size=1) for k in b["key"]]
    assert len(keys) == len(set(keys)) == manifest.val_samples
    braces = DataConfig(batch_size=2, workers=0, shuffle_buffer=4,
                        train_urls=f"{http_root}/train-{{000000..000001}}.tar")
    manifest = open_manifest(dataset, braces)
    assert len(list(train_loader(braces, manifest, rank=0, world_size=1, seed=0, epoch=0))) == 6


def test_all_damaged_training_data_is_an_error_not_a_hang(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    for shard in copy.glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes().replace(b"NUMPY", b"NUMPX"))  # every .npy header damaged
    data = DataConfig(batch_size=2, workers=0)
    with pytest.raises(DataError, match="training shards look unusable"):
        list(train_loader(data, open_manifest(copy), rank=0, world_size=1, seed=0, epoch=0))


def test_missing_shards_and_empty_datasets_fail_at_start(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "train-000001.tar").unlink()
    data = DataConfig(batch_size=2, workers=0)
    with pytest.raises(DataError, match=r"1 of 2 training shard\(s\) are missing, e.g. .*train-000001\.tar"):
        train_loader(data, open_manifest(copy), rank=0, world_size=1, seed=0, epoch=0)
    too_big = DataConfig(batch_size=2, workers=0, augment=AugmentConfig(crop=TILE + 1))
    with pytest.raises(DataError, match=r"data.augment.crop=17 is larger than the tiles \(16 px\)"):
        train_loader(too_big, open_manifest(dataset), rank=0, world_size=1, seed=0, epoch=0)
    manifest = open_manifest(dataset)
    manifest.val_samples = 0
    with pytest.raises(DataError, match="validation shards .* hold no samples"):
        val_loader(data, manifest, rank=0, world_size=1)
    manifest.train_shards = []
    with pytest.raises(DataError, match="no training shards"):
        train_loader(data, manifest, rank=0, world_size=1, seed=0, epoch=0)
