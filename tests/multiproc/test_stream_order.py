"""The training order does not depend on the world size or data.workers: global batch b is the same.

Ranks are simulated by calling the loader once per rank (the loaders take rank and world size as
arguments); DataLoader workers are real processes. 19 train tiles in 10 shards (one shorter, and
19 is not a multiple of the global batch 4, so the last batch is filled up).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from unetdist.config import AugmentConfig, DataConfig, ShardConfig
from unetdist.data.errors import DataError
from unetdist.data.order import epoch_order, per_device_batch
from unetdist.data.shards import write_shards
from unetdist.data.stream import batches_per_epoch, open_manifest, train_loader

GLOBAL = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("order")
    rng = np.random.default_rng(7)
    pairs = []
    for i, (h, w) in enumerate([(48, 32), (32, 32), (16, 48), (32, 48), (16, 16), (32, 16)]):
        image = rng.integers(0, 4096, (h, w), dtype=np.uint16)
        np.save(base / f"img_{i}.npy", image)
        np.save(base / f"lbl_{i}.npy", (image > 2048).astype(np.uint8))
        pairs.append((base / f"img_{i}.npy", base / f"lbl_{i}.npy"))
    cfg = ShardConfig(tile=16, overlap=0, shard_bytes=12000, val_fraction=0.2, seed=3)
    manifest = write_shards(pairs, base / "ds", cfg, num_classes=2)
    assert len(manifest["train"]["shards"]) >= 3 and manifest["train"]["samples"] % GLOBAL != 0
    return base / "ds"


def data_config(world_size: int, workers: int, **kw: object) -> DataConfig:
    aug = AugmentConfig(rotate_p=0.5, intensity_p=0.5)  # seeded augmentation must follow the samples too
    return DataConfig(batch_size=GLOBAL // world_size, workers=workers, shuffle_buffer=6, augment=aug, **kw)


def global_batches(root: Path, world_size: int, workers: int, epoch: int = 0, start: int = 0,
                   **kw: object) -> list[dict]:
    """The global batches: each rank's batch b, concatenated in rank order."""
    data = data_config(world_size, workers, **kw)
    manifest = open_manifest(root, data)
    per_rank = [list(train_loader(data, manifest, rank=r, world_size=world_size, seed=11, epoch=epoch,
                                  start_batch=start)) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # equal batch counts: no DDP hang
    return [{"key": [k for r in range(world_size) for k in per_rank[r][b]["key"]],
             "image": torch.cat([per_rank[r][b]["image"] for r in range(world_size)]),
             "label": torch.cat([per_rank[r][b]["label"] for r in range(world_size)])}
            for b in range(len(per_rank[0]))]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_global_batches_are_the_same_for_world_sizes_1_2_4_and_workers_0_1_2(root: Path) -> None:
    reference = global_batches(root, 1, 0)
    assert len(reference) == batches_per_epoch(data_config(1, 0), open_manifest(root), 1)
    for world_size in (1, 2, 4):
        for workers in (0, 1, 2):
            got = global_batches(root, world_size, workers)
            assert [b["key"] for b in got] == [b["key"] for b in reference], (world_size, workers)
            for a, b in zip(got, reference):
                assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_every_train_tile_once_per_epoch_and_the_order_changes_with_the_epoch(root: Path) -> None:
    manifest = open_manifest(root)
    orders = []
    for epoch in (0, 1):
        keys = [k for b in global_batches(root, 2, 0, epoch=epoch) for k in b["key"]]
        counts = Counter(keys)
        assert len(counts) == manifest.train_samples  # every tile
        padding = len(keys) - manifest.train_samples
        assert 0 <= padding < GLOBAL and sum(c - 1 for c in counts.values()) == padding  # the rest once
        orders.append(keys)
    assert orders[0] != orders[1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resuming_on_another_world_size_continues_the_same_global_batches(root: Path) -> None:
    full = global_batches(root, 2, 2, epoch=1)
    for world_size, start in ((1, 2), (4, 3)):
        resumed = global_batches(root, world_size, 1, epoch=1, start=start)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[start:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start:]))


def test_partitions_must_divide_the_global_batch(root: Path) -> None:
    data = data_config(2, 0, partitions=3)
    with pytest.raises(DataError, match=r"data.partitions=3 must divide the global batch 4"):
        train_loader(data, open_manifest(root), rank=0, world_size=2, seed=0, epoch=0)


def test_a_global_batch_gives_the_per_rank_batch_or_a_clear_error() -> None:
    assert [per_device_batch(8, 0, w) for w in (1, 2, 4)] == [8, 8, 8]  # no global batch: per device as given
    assert [per_device_batch(8, 48, w) for w in (1, 2, 4, 6)] == [48, 24, 12, 8]
    with pytest.raises(DataError, match=r"data.global_batch=48 is not divisible by the world size 5"):
        per_device_batch(8, 48, 5)
    with pytest.raises(DataError, match=r"gives 12 samples per device on 4 ranks, not divisible by train.grad_accum=5"):
        per_device_batch(8, 48, 4, grad_accum=5)


def test_each_partition_reads_whole_shards_in_sequence_with_a_bounded_block(root: Path) -> None:
    counts = open_manifest(root).train_shard_samples
    order = epoch_order(counts, seed=1, epoch=0, partitions=2, global_batch=4, shuffle_buffer=6)
    assert order.block == 3  # 6 raw samples held by a reader of both partitions
    covered = [s for p in range(2) for s in order.segments(p, 0, order.span)]
    laid_out = [(shard, offset) for shard, offset, count in covered for offset in range(offset, offset + count)]
    assert len(laid_out) == order.steps * 4
    expected = [(s, i) for s in order.shard_order for i in range(counts[s])]
    assert laid_out[: len(expected)] == expected  # shards end to end, each read from its start to its end
    assert laid_out[len(expected):] == expected[: len(laid_out) - len(expected)]  # padding wraps to the start
    positions = [order.raw_position(p, i) for p in range(2) for i in range(order.span)]
    assert sorted(positions[: order.span]) == list(range(order.span))  # a permutation within each partition
    assert all(abs(order.raw_position(0, i) - i) < order.block for i in range(order.span))


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requested.append(self.path)
        super().do_GET()


@pytest.fixture()
def served(root: Path) -> Iterator[tuple[str, list[str]]]:
    requested: list[str] = []
    handler = type("Handler", (_LoggingHandler,), {"requested": requested})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def test_each_rank_reads_only_the_shards_of_its_partitions(root: Path, served: tuple[str, list[str]]) -> None:
    url, requested = served
    data = data_config(2, 0, partitions=2)
    manifest = open_manifest(url, data)
    order = epoch_order(manifest.train_shard_samples, seed=11, epoch=0, partitions=2, global_batch=GLOBAL,
                        shuffle_buffer=data.shuffle_buffer)
    for rank in range(2):
        requested.clear()
        batches = list(train_loader(data, manifest, rank=rank, world_size=2, seed=11, epoch=0))
        assert len(batches) == order.steps
        needed = {f"/train-{s:06d}.tar" for s, _, _ in order.segments(rank, 0, order.span)}
        assert set(requested) == needed, rank  # rank r trains on partition r: only its shards are fetched
