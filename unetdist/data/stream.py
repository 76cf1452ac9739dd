"""The streaming loaders: WebDataset shards -> normalised, augmented batches for each rank.

Training must give every rank exactly the same number of batches whatever the shard count, or
DDP hangs; validation must see every tile exactly once. Neither needs torch.distributed: rank and
world size are arguments, so the loaders can be tested (and reasoned about) in one process.

Training, per rank: the epoch's `batches_per_epoch` batches are dealt round-robin to "lanes"
(one per DataLoader worker), batch b to lane b % lanes, because that is the order in which a
DataLoader collects its workers' batches. Each lane is an endless stream of shards resampled with
replacement (the first one entered at a random sample, so that short epochs still reach the
end of every shard), then a sample shuffle buffer, then decoding (with integrity checks), augmentation
seeded by the sample's position in the lane, normalisation (`data/normalize.py`: by default with the
percentiles of the tile's whole source frame, from the manifest) and batching (written in place into the
batch arrays); every random choice is seeded from (seed, rank, lane, epoch). Resuming at batch k hands worker w the lane of batch k + w and skips
that lane's earlier samples raw (before decoding), so the batches after k are exactly those of an
unbroken epoch. The data order depends on `data.workers`: resuming with a different worker count
gives a different (still valid) stream.

Validation, per rank: (rank, worker) slots share the shards: with at least as many shards as
slots, slot s reads shards s, s + slots, ...; with fewer, the slots mapped to one shard take
every k-th sample of it. Ranks may get different counts; the trainer only all-reduces after its loop.

Damaged data: a truncated or unreadable shard ends early and a damaged sample is skipped, each with
a warning; every batch carries `skipped`, the number of such events in its worker since that
worker's previous batch, so the trainer can sum and log them. (With damaged data a resumed epoch
is still valid but no longer sample-identical to the unbroken one: the resume skip counts raw samples.)
Batches: {"image": float32 [B, C, T, T], "label": int64 [B, T, T], "weight": float32 [B, T, T]
(when the shards hold weight maps), "key": list of B sample keys, "skipped": int64 scalar}.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from unetdist.config import AugmentConfig, DataConfig
from unetdist.data.augment import as_augment_config, augment_code, intensity, sample_rng, spatial
from unetdist.data.errors import DataError
from unetdist.data.manifest import IntensityStats, Manifest, open_manifest
from unetdist.data.normalize import Normalization, grid_bounds, grid_columns, normalize
from unetdist.data.reader import BadSample, ErrorCallback, SkipLog, decode, shard_samples

__all__ = ["IntensityStats", "Manifest", "batches_per_epoch", "normalize", "open_manifest", "train_loader",
           "val_loader", "val_assignment"]


def batches_per_epoch(data: DataConfig, manifest: Manifest, world_size: int) -> int:
    """Batches each rank yields per epoch: enough for every train tile once on average, at least 1."""
    return max(1, math.ceil(manifest.train_samples / (data.batch_size * world_size)))


def _seed(*parts: int) -> int:
    """A 64-bit seed mixing all parts (SeedSequence avoids the correlations of seed + rank arithmetic)."""
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(1, np.uint64)[0])


def _resampled(urls: list[str], counts: list[int] | None, rng: random.Random,
               on_error: ErrorCallback) -> Iterator[dict[str, Any]]:
    """Samples of shards drawn with replacement, forever; fails if the shards hold no samples.

    A lane restarts every epoch and may use less than one shard per epoch, so its first shard is
    read from a random sample on (wrapping around): otherwise the tail of every shard would never
    be trained on. Skipped samples are raw bytes only. Without per-shard counts it starts at 0.
    """
    dry, first = 0, True
    while True:
        index = rng.randrange(len(urls))
        expected = counts[index] if counts else None
        start = rng.randrange(expected) if first and expected else 0
        first = False
        rotated = itertools.chain(itertools.islice(shard_samples(urls[index], on_error, expected), start, None),
                                  itertools.islice(shard_samples(urls[index], on_error), start))
        found = False
        for sample in rotated:
            found = True
            yield sample
        dry = 0 if found else dry + 1
        if dry > 3 * len(urls) + 10:
            raise DataError(f"the training shards hold no readable samples (e.g. {urls[0]})")


def _decode(sample: dict[str, Any], num_classes: int, weights: bool) -> tuple[np.ndarray, np.ndarray, Any]:
    image, label, weight = decode(sample, num_classes)
    if weights and weight is None:
        raise BadSample(f"sample {sample.get('__key__')} has no wgt.npy member but the dataset has weight maps")
    return image, label, weight


@dataclass(frozen=True)
class Normalizer:
    """The normalisation of a run, and in percentile mode the (low, high) percentiles of every source frame."""

    norm: Normalization
    bounds_of: dict[tuple[int, int], np.ndarray] | None = None  # (source_index, frame) -> C x 2

    @classmethod
    def of(cls, data: DataConfig, manifest: Manifest) -> Normalizer:
        norm = manifest.normalization(data.normalize)
        if norm.mode == "dataset":
            return cls(norm)
        columns = grid_columns(manifest.image_percentiles, norm.percentiles, manifest.root)
        images = manifest.raw["image_percentiles"]["images"]
        return cls(norm, {(i, t): grid_bounds(frame, columns) for i, frames in enumerate(images)
                          for t, frame in enumerate(frames) if frame is not None})

    def bounds(self, sample: dict[str, Any]) -> np.ndarray | None:
        """The percentiles of the whole frame a tile was cut from (None in dataset mode)."""
        if self.bounds_of is None:
            return None
        try:
            meta = json.loads(sample["json"])
            return self.bounds_of[int(meta["source_index"]), int(meta.get("frame", 0))]
        except (KeyError, TypeError, ValueError) as exc:
            raise BadSample(f"sample {sample.get('__key__')}: its source image has no percentiles in the "
                            f"manifest ({exc!r})") from exc


Item = tuple[str, np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


class BatchBuffer:
    """One batch assembled in place: each sample is normalised (and intensity-augmented) straight into
    preallocated arrays, and flipped tiles are copied from views, so no per-sample copies and no stacking."""

    def __init__(self, size: int, norm: Normalization) -> None:
        self.size, self.norm = size, norm
        self.keys: list[str] = []
        self.image: np.ndarray | None = None
        self.label: np.ndarray | None = None
        self.weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, image: np.ndarray, label: np.ndarray, weight: np.ndarray | None,
            bounds: np.ndarray | None = None, post: Callable[[np.ndarray], Any] | None = None) -> None:
        """Write one sample; `post` then changes its normalised image in place. BadSample if it does not fit.

        `bounds`: the per-image percentiles of the tile's source image (percentile mode).
        """
        if self.image is None:
            self.image = np.empty((self.size, *image.shape), np.float32)
            self.label = np.empty((self.size, *label.shape), np.int64)
            self.weight = None if weight is None else np.empty((self.size, *weight.shape), np.float32)
        assert self.label is not None
        if image.shape != self.image.shape[1:] or (weight is None) != (self.weight is None):
            raise BadSample(f"sample {key}: image {image.shape} (weight map: {weight is not None}) does not fit "
                            f"the batch's {self.image.shape[1:]} (weight map: {self.weight is not None})")
        n = len(self.keys)
        normalize(image, self.norm, bounds, out=self.image[n])
        if post is not None:
            post(self.image[n])
        np.copyto(self.label[n], label)  # uint8 -> int64 in the same pass
        if weight is not None and self.weight is not None:
            np.copyto(self.weight[n], weight)
        self.keys.append(key)

    def tensors(self, skipped: int) -> dict[str, Any]:
        n = len(self.keys)
        assert self.image is not None and self.label is not None
        batch = {"image": torch.from_numpy(self.image[:n]), "label": torch.from_numpy(self.label[:n]),
                 "key": self.keys, "skipped": torch.tensor(skipped, dtype=torch.int64)}
        if self.weight is not None:
            batch["weight"] = torch.from_numpy(self.weight[:n])
        return batch


def _worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


@dataclass(frozen=True)
class TrainPlan:
    """Everything one rank's training stream depends on (picklable, for DataLoader workers)."""

    urls: list[str]
    counts: list[int] | None  # samples per shard, when known
    normalizer: Normalizer
    batch_size: int
    shuffle_buffer: int
    augment: AugmentConfig
    num_classes: int
    weights: bool  # the shards hold weight maps
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
    skips = SkipLog("training")
    shard_rng = random.Random(_seed(plan.seed, plan.rank, lane, plan.epoch, 1))
    raw: Iterator[dict[str, Any]] = _resampled(plan.urls, plan.counts, shard_rng, skips)
    if plan.shuffle_buffer > 1:
        rng = random.Random(_seed(plan.seed, plan.rank, lane, plan.epoch, 2))
        raw = shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=rng)(raw)
    batch = BatchBuffer(plan.batch_size, plan.normalizer.norm)
    bad_run, give_up = 0, max(1000, 3 * sum(plan.counts)) if plan.counts else 10000
    for position, sample in itertools.islice(enumerate(raw), skip * plan.batch_size, None):
        try:
            image, label, weight = _decode(sample, plan.num_classes, plan.weights)  # skipped samples: never decoded
            bounds = plan.normalizer.bounds(sample)
            _add_augmented(batch, plan, lane, position, sample["__key__"], image, label, weight, bounds)
        except BadSample as exc:
            skips(str(sample.get("__url__")), str(exc))
            bad_run += 1
            if bad_run >= give_up:
                raise DataError(f"{bad_run} training samples in a row were damaged (e.g. {exc}); "
                                "the training shards look unusable") from exc
            continue
        bad_run = 0
        if len(batch) == plan.batch_size:
            yield batch.tensors(skips.take())
            batch = BatchBuffer(plan.batch_size, plan.normalizer.norm)
            count -= 1
            if count == 0:
                return


def _add_augmented(batch: BatchBuffer, plan: TrainPlan, lane: int, position: int, key: str, image: np.ndarray,
                   label: np.ndarray, weight: np.ndarray | None, bounds: np.ndarray | None) -> None:
    """Geometry on the raw tile, normalisation, then intensity changes; all seeded by the position."""
    aug = plan.augment
    if not aug.enabled:
        batch.add(key, image, label, weight, bounds)
        return
    rng = sample_rng(plan.seed, plan.rank, lane, plan.epoch, position)
    code = augment_code(plan.seed, plan.rank, lane, plan.epoch, position)
    image, label, weight = spatial(rng, aug, code, image, label, weight, copy=False)
    batch.add(key, image, label, weight, bounds, post=lambda out: intensity(rng, aug, out))


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

    def __init__(self, manifest: Manifest, normalizer: Normalizer, batch_size: int, rank: int, world_size: int,
                 lanes: int) -> None:
        self.urls, self.counts, self.normalizer = list(manifest.val_shards), manifest.val_shard_samples, normalizer
        self.num_classes, self.weights, self.batch_size = manifest.num_classes, manifest.weights, batch_size
        self.rank, self.world_size, self.lanes = rank, world_size, lanes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skips = SkipLog("validation")
        ready: BatchBuffer | None = None  # a full batch held back, so the last batch also counts skips after it
        batch = BatchBuffer(self.batch_size, self.normalizer.norm)
        for key, image, label, weight, bounds in self._items(skips):
            try:
                batch.add(key, image, label, weight, bounds)
            except BadSample as exc:
                skips(key, str(exc))
                continue
            if len(batch) == self.batch_size:
                if ready is not None:
                    yield ready.tensors(skips.take())
                ready, batch = batch, BatchBuffer(self.batch_size, self.normalizer.norm)
        for last in [b for b in (ready, batch) if b is not None and len(b)]:
            yield last.tensors(skips.take())

    def _items(self, skips: SkipLog) -> Iterator[Item]:
        slot = self.rank * self.lanes + _worker()
        for shard, modulus, remainder in val_assignment(len(self.urls), self.world_size * self.lanes, slot):
            expected = self.counts[shard] if self.counts else None
            report: ErrorCallback = skips if remainder == 0 else _ignore  # a shard's readers report it once
            for index, sample in enumerate(shard_samples(self.urls[shard], report, expected)):
                if index % modulus != remainder:
                    continue
                try:
                    image, label, weight = _decode(sample, self.num_classes, self.weights)
                    bounds = self.normalizer.bounds(sample)
                except BadSample as exc:
                    skips(str(sample.get("__url__")), str(exc))
                    continue
                yield sample["__key__"], image, label, weight, bounds


def _ignore(where: str, problem: str) -> None:
    """Shard errors seen by a validation reader that shares the shard with the one that reports them."""


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _check_shards(urls: list[str], samples: int, what: str, root: str) -> None:
    """A clear error at start for an empty shard list, zero samples or missing local shard files."""
    if not urls:
        raise DataError(f"the dataset in {root} has no {what} shards")
    if samples <= 0:
        raise DataError(f"the {what} shards of the dataset in {root} hold no samples")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} {what} shard(s) are missing, e.g. {missing[0]}")


def _loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers > 0 else None, persistent_workers=False)


def train_loader(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int, seed: int, epoch: int,
                 start_batch: int = 0, pin_memory: bool = False) -> Iterable[dict[str, Any]]:
    """Exactly `batches_per_epoch(...) - start_batch` training batches for this rank.

    Batches are described in the module docstring (crops of `data.augment.crop` when set). The same arguments give the same batches; `start_batch=k` gives the unbroken epoch's batches from k on.
    """
    _check_rank(rank, world_size)
    _check_shards(manifest.train_shards, manifest.train_samples, "training", manifest.root)
    augment = as_augment_config(data.augment)
    if augment.enabled and augment.crop > manifest.tile:
        raise DataError(f"data.augment.crop={augment.crop} is larger than the tiles ({manifest.tile} px) "
                        f"of the dataset in {manifest.root}")
    total = batches_per_epoch(data, manifest, world_size)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}] (batches per epoch), got {start_batch}")
    plan = TrainPlan(urls=list(manifest.train_shards), counts=manifest.train_shard_samples,
                     normalizer=Normalizer.of(data, manifest),
                     batch_size=data.batch_size, shuffle_buffer=data.shuffle_buffer,
                     augment=augment, num_classes=manifest.num_classes,
                     weights=manifest.weights, seed=seed, rank=rank, epoch=epoch, lanes=max(1, data.workers),
                     total=total, start_batch=start_batch)
    return _loader(TrainStream(plan), data.workers, pin_memory)


def val_loader(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int,
               pin_memory: bool = False) -> Iterable[dict[str, Any]]:
    """This rank's share of the validation tiles (every tile once across all ranks and workers).

    Batches are like `train_loader`'s, the last one of each worker possibly smaller; a rank may get none.
    """
    _check_rank(rank, world_size)
    _check_shards(manifest.val_shards, manifest.val_samples, "validation", manifest.root)
    dataset = ValStream(manifest, Normalizer.of(data, manifest), data.batch_size, rank, world_size,
                        max(1, data.workers))
    return _loader(dataset, data.workers, pin_memory)
