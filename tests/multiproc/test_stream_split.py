"""Per-rank/per-worker splitting of the streaming loaders, with 2 simulated ranks x 2 workers.

The loaders take rank and world size as arguments, so the ranks are simulated by calling them
once per rank in one process; the DataLoader workers are real processes. Shard counts (3 train,
5 or 3 validation) do not divide 2 ranks x 2 workers, and the last shards are shorter.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from unetdist.config import AugmentConfig, DataConfig, ShardConfig
from unetdist.data import stream as stream_module
from unetdist.data.normalize import Normalization
from unetdist.data.shards import write_shards
from unetdist.data.stream import Manifest, batches_per_epoch, normalize, open_manifest, train_loader, val_loader
from unetdist.data.tiling import tile_grid

SIZES = [(32, 48), (16, 40), (40, 32), (32, 32), (20, 50), (48, 16), (30, 30), (16, 16), (24, 20)]
LAYOUTS = {  # shard_bytes -> (train shard sizes, val shard sizes) with split seed 1
    20480: ([5, 5, 5], [5, 5, 5, 5, 4]),
    40960: ([11, 4], [11, 11, 2]),
    1 << 20: ([15], [24]),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    pairs = []
    for i, (h, w) in enumerate(SIZES):
        np.save(base / f"img_{i}.npy", rng.integers(0, 65536, (h, w), dtype=np.uint16))
        np.save(base / f"lbl_{i}.npy", rng.integers(0, 2, (h, w), dtype=np.uint8))
        pairs.append((base / f"img_{i}.npy", base / f"lbl_{i}.npy"))
    roots = {}
    for shard_bytes, (train_sizes, val_sizes) in LAYOUTS.items():
        cfg = ShardConfig(tile=16, overlap=0, shard_bytes=shard_bytes, val_fraction=0.6, seed=1)
        manifest = write_shards(pairs, base / f"ds{shard_bytes}", cfg, num_classes=2)
        assert [s["samples"] for s in manifest["train"]["shards"]] == train_sizes  # the layout the tests claim
        assert [s["samples"] for s in manifest["val"]["shards"]] == val_sizes
        roots[shard_bytes] = base / f"ds{shard_bytes}"
    return roots


def raw_samples(manifest: Manifest, split: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for url in getattr(manifest, f"{split}_shards"):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                entry = out.setdefault(key, {})
                entry[suffix] = json.loads(data) if suffix == "json" else np.load(io.BytesIO(data))
    return out


def normalized(manifest: Manifest, sample: dict) -> np.ndarray:
    """A stored tile normalised the default way: by the 1/99.8 percentiles of its whole source image."""
    source = np.load(manifest.raw["inputs"][sample["json"]["source_index"]]["image"])
    bounds = np.percentile(source.astype(np.float64), [1.0, 99.8])[None]
    return normalize(sample["img.npy"], Normalization("percentile", manifest.stats), bounds)


def collect(loader: Iterable[dict]) -> list[dict]:
    return list(loader)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def data_config(**kw) -> DataConfig:
    values = dict(batch_size=2, workers=2, shuffle_buffer=8, augment=AugmentConfig())
    values.update(kw)
    return DataConfig(**values)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize(("world_size", "workers", "batch_size"), [(2, 2, 2), (2, 2, 3), (2, 3, 2), (3, 2, 1)])
def test_every_rank_gets_exactly_batches_per_epoch(
    datasets: dict[int, Path], world_size: int, workers: int, batch_size: int
) -> None:
    manifest = open_manifest(datasets[20480])
    data = data_config(batch_size=batch_size, workers=workers)
    expected = batches_per_epoch(data, manifest, world_size)
    assert expected == -(-15 // (batch_size * world_size))
    train_keys = set(raw_samples(manifest, "train"))
    for rank in range(world_size):
        batches = collect(train_loader(data, manifest, rank=rank, world_size=world_size, seed=3, epoch=0))
        assert len(batches) == expected
        for batch in batches:
            assert batch["image"].shape == (batch_size, 1, 16, 16) and batch["image"].dtype == torch.float32
            assert batch["label"].shape == (batch_size, 16, 16) and batch["label"].dtype == torch.int64
            assert set(batch["key"]) <= train_keys


def test_training_stream_is_deterministic_and_seeded_per_rank_and_epoch(datasets: dict[int, Path]) -> None:
    manifest = open_manifest(datasets[20480])
    data = data_config()

    def run(**kw: int) -> list[dict]:
        return collect(train_loader(data, manifest, **{"rank": 0, "world_size": 2, "seed": 3, "epoch": 0, **kw}))

    first = run()
    assert_same_batches(first, run())
    keys = [b["key"] for b in first]
    assert keys != [b["key"] for b in run(epoch=1)]
    assert keys != [b["key"] for b in run(rank=1)]
    assert keys != [b["key"] for b in run(seed=4)]


def test_batches_are_normalised_and_augmented_copies_of_the_stored_tiles(datasets: dict[int, Path]) -> None:
    manifest = open_manifest(datasets[20480])
    raw = raw_samples(manifest, "train")
    batches = collect(train_loader(data_config(workers=0), manifest, rank=1, world_size=2, seed=0, epoch=2))
    transforms_seen = set()
    for batch in batches:
        for key, image, label in zip(batch["key"], batch["image"].numpy(), batch["label"].numpy()):
            stored = normalized(manifest, raw[key])
            matches = [c for c in range(8) if np.array_equal(image, _dihedral(stored, c))
                       and np.array_equal(label, _dihedral(raw[key]["lbl.npy"], c))]
            assert matches, f"batch tile {key} is not a flip/rotation of the stored tile"
            transforms_seen.add(matches[0])
    assert len(transforms_seen) > 1


def _dihedral(array: np.ndarray, code: int) -> np.ndarray:
    out = np.rot90(array, code % 4, axes=(-2, -1))
    return out[..., ::-1] if code >= 4 else out


@pytest.mark.parametrize("batch_size", [2, 3])
def test_resume_at_any_batch_gives_the_rest_of_the_unbroken_epoch(datasets: dict[int, Path], batch_size: int) -> None:
    manifest = open_manifest(datasets[20480])
    data = data_config(batch_size=batch_size, workers=2)
    full = collect(train_loader(data, manifest, rank=1, world_size=2, seed=5, epoch=1))
    assert len(full) == batches_per_epoch(data, manifest, 2)
    for start in range(1, len(full) + 1):
        resumed = collect(train_loader(data, manifest, rank=1, world_size=2, seed=5, epoch=1, start_batch=start))
        assert_same_batches(resumed, full[start:])


def test_resume_skips_samples_without_decoding_them(
    datasets: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = open_manifest(datasets[20480])
    data = data_config(batch_size=2, workers=0)
    decoded = []
    real = stream_module._decode
    monkeypatch.setattr(stream_module, "_decode", lambda sample, *a: decoded.append(sample["__key__"]) or real(sample, *a))
    total = batches_per_epoch(data, manifest, 2)
    collect(train_loader(data, manifest, rank=0, world_size=2, seed=5, epoch=0, start_batch=total - 1))
    assert len(decoded) == data.batch_size  # only the one batch that is yielded


def test_short_epochs_still_reach_the_end_of_a_single_shard(datasets: dict[int, Path]) -> None:
    manifest = open_manifest(datasets[1 << 20])  # one train shard of 15 tiles
    data = data_config(batch_size=1, workers=0, shuffle_buffer=2)  # each rank reads ~6 tiles per epoch
    seen: list[str] = []
    for epoch in range(8):
        for rank in range(4):
            batches = collect(train_loader(data, manifest, rank=rank, world_size=4, seed=0, epoch=epoch))
            seen += [k for b in batches for k in b["key"]]
    counts = {key: seen.count(key) for key in raw_samples(manifest, "train")}
    assert min(counts.values()) >= 2, counts  # 128 draws of 15 tiles: every tile, none starved


def test_workers_zero_and_one_give_the_same_single_lane_stream(datasets: dict[int, Path]) -> None:
    manifest = open_manifest(datasets[20480])
    zero = collect(train_loader(data_config(workers=0), manifest, rank=0, world_size=2, seed=1, epoch=0))
    one = collect(train_loader(data_config(workers=1), manifest, rank=0, world_size=2, seed=1, epoch=0))
    assert_same_batches(zero, one)


@pytest.mark.parametrize(
    ("shard_bytes", "world_size", "workers"), [(20480, 2, 2), (40960, 2, 2), (20480, 3, 2), (40960, 1, 0), (1 << 20, 2, 2)]
)
def test_validation_visits_every_tile_exactly_once(
    datasets: dict[int, Path], shard_bytes: int, world_size: int, workers: int
) -> None:
    manifest = open_manifest(datasets[shard_bytes])
    raw = raw_samples(manifest, "val")
    data = data_config(batch_size=3, workers=workers)
    keys: list[str] = []
    for rank in range(world_size):
        batches = collect(val_loader(data, manifest, rank=rank, world_size=world_size))
        for batch in batches:
            assert 1 <= len(batch["key"]) <= 3
            for key, image, label in zip(batch["key"], batch["image"].numpy(), batch["label"].numpy()):
                np.testing.assert_array_equal(image, normalized(manifest, raw[key]))  # no augmentation
                np.testing.assert_array_equal(label, raw[key]["lbl.npy"])
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == manifest.val_samples == 24
    assert set(keys) == set(raw)
    tiles = {(raw[k]["json"]["source_index"], raw[k]["json"]["y"], raw[k]["json"]["x"]) for k in keys}
    val_images = {raw[k]["json"]["source_index"] for k in keys}
    assert tiles == {(i, y, x) for i in val_images for y, x in tile_grid(*SIZES[i], 16, 0)}


def test_validation_order_is_deterministic(datasets: dict[int, Path]) -> None:
    manifest = open_manifest(datasets[40960])
    data = data_config(batch_size=2, workers=2)
    first = collect(val_loader(data, manifest, rank=1, world_size=2))
    assert_same_batches(first, collect(val_loader(data, manifest, rank=1, world_size=2)))


def test_url_overrides_brace_expansion_and_pipe(datasets: dict[int, Path]) -> None:
    root = datasets[20480]
    data = data_config(train_urls=f"{root}/train-{{000000..000002}}.tar", val_urls=f"pipe:cat {root}/val-000004.tar",
                       workers=0)
    manifest = open_manifest(root, data)
    assert len(manifest.train_shards) == 3 and manifest.train_samples == 15
    assert manifest.val_shards == [f"pipe:cat {root}/val-000004.tar"] and manifest.val_samples == 4
    assert len(collect(train_loader(data, manifest, rank=0, world_size=2, seed=0, epoch=0))) == 4
    assert sum(len(b["key"]) for b in collect(val_loader(data, manifest, rank=0, world_size=1))) == 4
