"""The streaming loaders: WebDataset shards -> normalised, augmented batches for each rank.

Training must give every rank exactly the same number of batches whatever the shard count, or
DDP hangs; validation must see every tile exactly once. Neither needs torch.distributed: rank and
world size are arguments, so the loaders can be tested (and reasoned about) in one process.

Training, per rank: the epoch's `batches_per_epoch` batches are dealt round-robin to "lanes"
(one per DataLoader worker), batch b to lane b % lanes, because that is the order in which a
DataLoader collects its workers' batches. Each lane is an endless stream of shards resampled with
replacement (the first one entered at a random sample, so that short epochs still reach the
end of every shard), then a sample shuffle buffer, then decoding, a dihedral augmentation chosen from the
sample's position in the lane, normalisation and batching; every random choice is seeded from
(seed, rank, lane, epoch). Resuming at batch k hands worker w the lane of batch k + w and skips
that lane's earlier samples raw (before decoding), so the batches after k are exactly those of an
unbroken epoch. The data order depends on `data.workers`: resuming with a different worker count
gives a different (still valid) stream.

Validation, per rank: (rank, worker) slots share the shards: with at least as many shards as
slots, slot s reads shards s, s + slots, ...; with fewer, the slots mapped to one shard take
every k-th sample of it. Ranks may get different counts; the trainer only all-reduces after its loop.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from unetdist.config import DataConfig
from unetdist.data.augment import augment_code, dihedral
from unetdist.data.manifest import IntensityStats, Manifest, normalize, open_manifest
from unetdist.data.shards import DataError

__all__ = ["IntensityStats", "Manifest", "batches_per_epoch", "normalize", "open_manifest", "train_loader",
           "val_loader", "val_assignment"]


def batches_per_epoch(data: DataConfig, manifest: Manifest, world_size: int) -> int:
    """Batches each rank yields per epoch: enough for every train tile once on average, at least 1."""
    return max(1, math.ceil(manifest.train_samples / (data.batch_size * world_size)))


def _seed(*parts: int) -> int:
    """A 64-bit seed mixing all parts (SeedSequence avoids the correlations of seed + rank arithmetic)."""
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(1, np.uint64)[0])


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (undecoded bytes per member) of one shard, in tar order; any WebDataset URL."""
    stream = gopen(url, "rb")
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def _resampled(urls: list[str], counts: list[int] | None, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Samples of shards drawn with replacement, forever; fails if the shards hold no samples.

    A lane restarts every epoch and may use less than one shard per epoch, so its first shard is
    read from a random sample on (wrapping around): otherwise the tail of every shard would never
    be trained on. Skipped samples are raw bytes only. Without per-shard counts it starts at 0.
    """
    dry, first = 0, True
    while True:
        index = rng.randrange(len(urls))
        start = rng.randrange(counts[index]) if first and counts and counts[index] > 0 else 0
        first = False
        rotated = itertools.chain(itertools.islice(shard_samples(urls[index]), start, None),
                                  itertools.islice(shard_samples(urls[index]), start))
        found = False
        for sample in rotated:
            found = True
            yield sample
        dry = 0 if found else dry + 1
        if dry > 3 * len(urls) + 10:
            raise DataError(f"the training shards hold no samples (e.g. {urls[0]})")


def _decode(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = np.load(io.BytesIO(sample["img.npy"]), allow_pickle=False)
        label = np.load(io.BytesIO(sample["lbl.npy"]), allow_pickle=False)
    except KeyError as exc:
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no {exc.args[0]} member; "
                        "shards must be written by `unetdist shard`") from exc
    return image, label


def _collate(items: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    keys, images, labels = zip(*items)
    return {"image": torch.from_numpy(np.stack(images)),
            "label": torch.from_numpy(np.stack(labels).astype(np.int64)), "key": list(keys)}


def _worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


@dataclass(frozen=True)
class TrainPlan:
    """Everything one rank's training stream depends on (picklable, for DataLoader workers)."""

    urls: list[str]
    counts: list[int] | None  # samples per shard, when known
    stats: IntensityStats
    batch_size: int
    shuffle_buffer: int
    augment: bool
    seed: int
    rank: int
    epoch: int
    lanes: int
    total: int  # batches per epoch
    start_batch: int


def lane_batches(plan: TrainPlan, lane: int, skip: int, count: int) -> Iterator[dict[str, Any]]:
    """Batches `skip` .. `skip + count` of one lane's stream for this epoch."""
    if count <= 0:
        return
    shard_rng = random.Random(_seed(plan.seed, plan.rank, lane, plan.epoch, 1))
    raw: Iterator[dict[str, Any]] = _resampled(plan.urls, plan.counts, shard_rng)
    if plan.shuffle_buffer > 1:
        rng = random.Random(_seed(plan.seed, plan.rank, lane, plan.epoch, 2))
        raw = shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=rng)(raw)
    first = skip * plan.batch_size
    batch: list[tuple[str, np.ndarray, np.ndarray]] = []
    for position, sample in itertools.islice(enumerate(raw), first, first + count * plan.batch_size):
        image, label = _decode(sample)  # skipped samples above were never decoded
        if plan.augment:
            image, label = dihedral(image, label, augment_code(plan.seed, plan.rank, lane, plan.epoch, position))
        batch.append((sample["__key__"], normalize(image, plan.stats), label))
        if len(batch) == plan.batch_size:
            yield _collate(batch)
            batch = []


class TrainStream(IterableDataset):
    """One rank's epoch; each DataLoader worker produces the lane its round-robin turn needs."""

    def __init__(self, plan: TrainPlan) -> None:
        self.plan = plan

    def __len__(self) -> int:
        return self.plan.total - self.plan.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.plan
        lane = (p.start_batch + _worker()) % p.lanes
        skip = len(range(lane, p.start_batch, p.lanes))  # this lane's batches before start_batch
        return lane_batches(p, lane, skip, len(range(lane, p.total, p.lanes)) - skip)


def val_assignment(shards: int, slots: int, slot: int) -> list[tuple[int, int, int]]:
    """(shard index, modulus, remainder): slot `slot` reads the samples i of the shard with i % modulus == remainder."""
    if shards >= slots:
        return [(s, 1, 0) for s in range(slot, shards, slots)]
    shard = slot % shards
    return [(shard, len(range(shard, slots, shards)), slot // shards)]


class ValStream(IterableDataset):
    """One rank's share of the validation tiles, in a fixed order, without augmentation."""

    def __init__(self, urls: list[str], stats: IntensityStats, batch_size: int, rank: int, world_size: int,
                 lanes: int) -> None:
        self.urls, self.stats, self.batch_size = urls, stats, batch_size
        self.rank, self.world_size, self.lanes = rank, world_size, lanes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = self.rank * self.lanes + _worker()
        batch: list[tuple[str, np.ndarray, np.ndarray]] = []
        for shard, modulus, remainder in val_assignment(len(self.urls), self.world_size * self.lanes, slot):
            for index, sample in enumerate(shard_samples(self.urls[shard])):
                if index % modulus != remainder:
                    continue
                image, label = _decode(sample)
                batch.append((sample["__key__"], normalize(image, self.stats), label))
                if len(batch) == self.batch_size:
                    yield _collate(batch)
                    batch = []
        if batch:
            yield _collate(batch)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers > 0 else None, persistent_workers=False)


def train_loader(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int, seed: int, epoch: int,
                 start_batch: int = 0, pin_memory: bool = False) -> Iterable[dict[str, Any]]:
    """Exactly `batches_per_epoch(...) - start_batch` training batches for this rank.

    Each batch is {"image": float32 [B, C, T, T], "label": int64 [B, T, T], "key": list of B sample keys}.
    The same arguments give the same batches; `start_batch=k` gives the unbroken epoch's batches from k on.
    """
    _check_rank(rank, world_size)
    if not manifest.train_shards:
        raise DataError(f"the dataset in {manifest.root} has no training shards")
    total = batches_per_epoch(data, manifest, world_size)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}] (batches per epoch), got {start_batch}")
    plan = TrainPlan(urls=list(manifest.train_shards), counts=manifest.train_shard_samples, stats=manifest.stats,
                     batch_size=data.batch_size, shuffle_buffer=data.shuffle_buffer, augment=data.augment, seed=seed, rank=rank, epoch=epoch,
                     lanes=max(1, data.workers), total=total, start_batch=start_batch)
    return _loader(TrainStream(plan), data.workers, pin_memory)


def val_loader(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int,
               pin_memory: bool = False) -> Iterable[dict[str, Any]]:
    """This rank's share of the validation tiles (every tile once across all ranks and workers).

    Batches are like `train_loader`'s, the last one of each worker possibly smaller; a rank may get none.
    """
    _check_rank(rank, world_size)
    if not manifest.val_shards:
        raise DataError(f"the dataset in {manifest.root} has no validation shards")
    lanes = max(1, data.workers)
    dataset = ValStream(list(manifest.val_shards), manifest.stats, data.batch_size, rank, world_size, lanes)
    return _loader(dataset, data.workers, pin_memory)
