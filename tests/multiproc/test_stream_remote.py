"""Shards from a real HTTP server: retries that resume at the same byte, unreachable shards, the node cache.

The server (tests/cluster/faulty_http.py) is a real threaded HTTP server on 127.0.0.1 that fails on
purpose: 503 answers, connections dropped mid-shard, shards that never come. The loaders must give
exactly the batches they give from the same shards on local disk, and count what they retried or skipped.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cluster.faulty_http import Plan, folder_size, serve
from unetdist.config import AugmentConfig, CacheConfig, DataConfig, ShardConfig
from unetdist.data.errors import DataError
from unetdist.data.shards import write_shards
from unetdist.data.stream import open_manifest, train_loader, val_loader


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("remote")
    rng = np.random.default_rng(3)
    pairs = []
    for i in range(5):
        image = rng.integers(0, 4096, (32, 48), dtype=np.uint16)
        np.save(base / f"img_{i}.npy", image)
        np.save(base / f"lbl_{i}.npy", (image > 2048).astype(np.uint8))
        pairs.append((base / f"img_{i}.npy", base / f"lbl_{i}.npy"))
    write_shards(pairs, base / "ds", ShardConfig(tile=16, shard_bytes=12000, val_fraction=0.2, seed=0), num_classes=2)
    return base / "ds"


def config(**kw: object) -> DataConfig:
    values: dict = dict(batch_size=4, workers=0, shuffle_buffer=8, augment=AugmentConfig(rotate_p=0.5),
                        retries=3, retry_wait=0.01)
    values.update(kw)
    return DataConfig(**values)


def epoch(root: str | Path, data: DataConfig, number: int = 0) -> list[dict]:
    return list(train_loader(data, open_manifest(root, data), rank=0, world_size=1, seed=2, epoch=number))


def same(a: list[dict], b: list[dict]) -> bool:
    return [x["key"] for x in a] == [x["key"] for x in b] and all(
        torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def train_paths(root: Path) -> list[str]:
    return [f"/{p.name}" for p in sorted(root.glob("train-*.tar"))]


@pytest.mark.parametrize("ranges", [True, False], ids=["range-requests", "no-range-support"])
def test_5xx_and_dropped_connections_are_retried_and_continue_at_the_same_sample(root: Path, ranges: bool) -> None:
    local = epoch(root, config())
    shards = train_paths(root)
    plan = Plan(root, ranges=ranges, faults={p: ["503", "cut"] for p in shards})
    with serve(plan) as url:
        remote = epoch(url, config())
    assert same(remote, local)  # same samples, same order, same augmentation
    assert sum(int(b["retries"]) for b in remote) == 2 * len(shards)  # a 503 and a cut per shard
    assert sum(int(b["skipped"]) for b in remote) == 0
    resumed = [r for p, r in plan.log if p == shards[0]][2]
    assert resumed.startswith("bytes=") and int(resumed[6:-1]) > 0  # the retry asked for the rest only


def test_an_unreachable_shard_is_skipped_counted_and_replaced(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = open_manifest(root)
    lost = train_paths(root)[1]
    lost_samples = manifest.train_shard_samples[1]
    plan = Plan(root, always={lost: "503"})
    with serve(plan) as url, caplog.at_level("WARNING"):
        batches = epoch(url, config(retries=2))
    assert all(b["image"].shape[0] == 4 for b in batches)  # full batches: ranks stay in step
    assert sum(int(b["skipped"]) for b in batches) >= lost_samples  # its samples (a wrapped repeat may add)
    assert not any(k.startswith(tuple(key for key in _keys_of(root, 1))) for b in batches for k in b["key"])
    assert any(lost.lstrip("/") in r.getMessage() and "gave up after 2 retries" in r.getMessage()
               for r in caplog.records)


def _keys_of(root: Path, shard: int) -> list[str]:
    import tarfile

    with tarfile.open(sorted(root.glob("train-*.tar"))[shard]) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def test_training_stops_when_most_shards_are_gone(root: Path) -> None:
    shards = train_paths(root)
    plan = Plan(root, always={p: "404" for p in shards[: len(shards) * 3 // 4 + 1]})
    with serve(plan) as url, pytest.raises(DataError, match="most of the training data is gone|look unusable"):
        epoch(url, config(retries=0))


def test_a_missing_manifest_on_the_server_says_no_dataset(root: Path) -> None:
    with serve(Plan(root.parent)) as url, pytest.raises(FileNotFoundError, match=r"no dataset in http://.*/nothing"):
        open_manifest(f"{url}/nothing", config())


def _read_epochs(url: str, cache: str, out: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    """A rank of a node: two epochs through the shared cache."""
    data = config(cache=CacheConfig(dir=cache, prefetch=2))
    barrier.wait()
    keys = [k for number in (0, 1) for b in epoch(url, data, number) for k in b["key"]]
    Path(out).write_text("\n".join(keys))


@pytest.mark.slow
def test_two_processes_of_a_node_download_each_shard_once_and_later_epochs_read_the_cache(
        root: Path, tmp_path: Path) -> None:
    plan = Plan(root)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    with serve(plan) as url:
        procs = [ctx.Process(target=_read_epochs, args=(url, str(tmp_path / "cache"), str(tmp_path / f"k{i}"),
                                                         barrier)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0]
        for path in train_paths(root):
            assert plan.gets(path) == 1, (path, plan.log)  # once per node, for two processes and two epochs
        assert (tmp_path / "k0").read_text() == (tmp_path / "k1").read_text()
        local = [k for number in (0, 1) for b in epoch(root, config(), number) for k in b["key"]]
        assert (tmp_path / "k0").read_text().split("\n") == local
        cached = [f for f in (tmp_path / "cache").iterdir() if f.suffix == ".tar"]
        assert len(cached) == len(train_paths(root)) and not list((tmp_path / "cache").glob("*.part-*"))


def test_the_cache_evicts_least_recently_used_shards_above_max_bytes(root: Path, tmp_path: Path) -> None:
    shard_size = max(p.stat().st_size for p in root.glob("train-*.tar"))
    limit = 3 * shard_size
    plan = Plan(root)
    with serve(plan) as url:
        data = config(cache=CacheConfig(dir=str(tmp_path / "cache"), max_bytes=limit, prefetch=0))
        first = epoch(url, data)
        assert folder_size(tmp_path / "cache") <= limit
        assert same(first, epoch(root, config()))
        again = epoch(url, data, 1)  # evicted shards come again from the server
        assert same(again, epoch(root, config(), 1))
    assert folder_size(tmp_path / "cache") <= limit
    assert len(plan.log) > len(train_paths(root)) + 1  # some shards were downloaded twice


def test_validation_reads_the_server_too(root: Path) -> None:
    with serve(Plan(root)) as url:
        data = config()
        keys = [k for b in val_loader(data, open_manifest(url, data), rank=0, world_size=1) for k in b["key"]]
    assert len(keys) == len(set(keys)) == open_manifest(root).val_samples
