"""The streaming loaders: WebDataset shards -> normalised, augmented batches for each rank.

Training must give every rank exactly the same number of batches whatever the shard count, or
DDP hangs; validation must see every tile exactly once. Neither needs torch.distributed: rank and
world size are arguments, so the loaders can be tested (and reasoned about) in one process.

Training: the epoch's sample order comes from `unetdist.data.order` and depends only on (seed,
epoch), the global batch G = data.batch_size x world size, and data.partitions: global batch b
holds the same samples, augmented the same way (seeded by the sample's partition and position),
for any world size and any data.workers. Every train tile comes once per epoch (the last batch is
filled up with the epoch's first samples). Each rank reads only the partitions of its slots, their
shards sequentially, holding one shuffle block of raw samples per partition. DataLoader worker w
builds the rank's batches start + w, start + w + workers, ... (the order in which a DataLoader
collects them), reading past the other workers' samples raw; resuming at batch k reads raw
samples up to it and decodes only what it yields. Each sample is normalised (`data/normalize.py`:
by default with the percentiles of the tile's whole source frame, from the manifest) before the
intensity augmentation, in training and validation alike.
samples up to it and decodes only what it yields. Training reads the whole run through one
DataLoader (`run_loader`): step g is batch b of epoch e, (e, b) = divmod(g, batches per epoch),
and each worker plans the next epoch itself, so its processes outlive the epoch boundary.

Validation, per rank: (rank, worker) slots share the shards: with at least as many shards as
slots, slot s reads shards s, s + slots, ...; with fewer, the slots mapped to one shard take
every k-th sample of it. Ranks may get different counts; the trainer only all-reduces after its loop.

Damaged or unreachable data: a truncated, unreadable or unreachable shard (after the retries of
`unetdist.data.remote`) ends early with a warning, and its missing samples, like a damaged sample,
are replaced in their batch by another sample of the same batch (differently augmented), so batches
stay full and in step across ranks. Every batch carries `skipped`, the replaced samples of this
batch (so the sum over ranks and workers counts each once), and `retries`, the HTTP retries of its
worker since its previous batch. Training fails when more than half of the samples read are bad.
Batches: {"image": float32 [B, C, T, T], "label": int64 [B, T, T], "weight": float32 [B, T, T]
(when the shards hold weight maps), "key": list of B sample keys, "skipped": int64 scalar,
"retries": int64 scalar}.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unetdist.config import AugmentConfig, DataConfig
from unetdist.data.augment import as_augment_config, augment_code, draw_spatial, intensity, sample_rng, spatial
from unetdist.data.augment_batch import pack_draw
from unetdist.data.errors import DataError
from unetdist.data.manifest import IntensityStats, Manifest, open_manifest
from unetdist.data.normalize import Normalization, grid_bounds, grid_columns, normalize
from unetdist.data.order import EpochOrder, auto_partitions, check_layout, epoch_order, rank_slots
from unetdist.data.reader import BadSample, ErrorCallback, SkipLog, decode, shard_samples
from unetdist.data.remote import ShardOpener, retries_so_far

__all__ = ["IntensityStats", "Manifest", "batches_per_epoch", "normalize", "open_manifest", "run_loader",
           "train_loader", "val_loader", "val_assignment"]


def batches_per_epoch(data: DataConfig, manifest: Manifest, world_size: int) -> int:
    """Global batches per epoch: every train tile once, the last batch filled up; at least 1."""
    return max(1, -(-manifest.train_samples // (data.batch_size * world_size)))


def partitions_for(data: DataConfig, manifest: Manifest, world_size: int) -> int:
    """data.partitions, or (0) the largest divisor of the global batch up to the number of train shards."""
    global_batch = data.batch_size * world_size
    if data.partitions > 0:
        return data.partitions
    return auto_partitions(global_batch, len(manifest.train_shards))


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
        self.spatial: list[np.ndarray] = []  # drawn geometry per sample, when the device applies it

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, image: np.ndarray, label: np.ndarray, weight: np.ndarray | None,
            bounds: np.ndarray | None = None, post: Callable[[np.ndarray], Any] | None = None,
            spatial: np.ndarray | None = None) -> None:
        """Write one sample; `post` then changes its normalised image in place. BadSample if it does not fit.

        `bounds`: the per-image percentiles of the tile's source image (percentile mode).
        `spatial`: the drawn geometry, when the trainer applies it to the batch on its device.
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
        if spatial is not None:
            self.spatial.append(spatial)
        self.keys.append(key)

    def tensors(self, skipped: int) -> dict[str, Any]:
        n = len(self.keys)
        assert self.image is not None and self.label is not None
        batch = {"image": torch.from_numpy(self.image[:n]), "label": torch.from_numpy(self.label[:n]),
                 "key": self.keys, "skipped": torch.tensor(skipped, dtype=torch.int64)}
        if self.weight is not None:
            batch["weight"] = torch.from_numpy(self.weight[:n])
        if self.spatial:
            batch["spatial"] = torch.from_numpy(np.stack(self.spatial))
        return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass(frozen=True)
class TrainPlan:
    """Everything one rank's training stream depends on (picklable, for DataLoader workers)."""

    urls: list[str]
    counts: list[int]  # samples per shard
    normalizer: Normalizer
    batch_size: int  # per rank
    world_size: int
    rank: int
    partitions: int
    shuffle_buffer: int
    augment: AugmentConfig
    num_classes: int
    shape: tuple[int, ...]  # C, T, T of every stored image tile
    weights: bool  # the shards hold weight maps
    seed: int
    epoch: int
    start_batch: int
    opener: ShardOpener

    def order(self) -> EpochOrder:
        return epoch_order(self.counts, seed=self.seed, epoch=self.epoch, partitions=self.partitions,
                           global_batch=self.batch_size * self.world_size, shuffle_buffer=self.shuffle_buffer)


class PartitionReader:
    """Output positions of one partition, asked for in increasing order; one block of raw samples held."""

    def __init__(self, order: EpochOrder, partition: int, plan: TrainPlan, on_error: ErrorCallback) -> None:
        self.order, self.partition, self.plan, self.on_error = order, partition, plan, on_error
        self.block = -1
        self.items: list[dict[str, Any] | None] = []
        self.perm = np.zeros(0, np.int64)
        self.stream: Iterator[dict[str, Any]] | None = None
        self.at: tuple[int, int] = (-1, -1)  # (shard, offset) the open stream yields next

    def get(self, position: int) -> dict[str, Any] | None:
        """The raw sample at an output position; None where its shard broke off or could not be read."""
        block, within = divmod(position, self.order.block)
        if block != self.block:
            start = block * self.order.block
            self.items = list(self._raw(start, min(start + self.order.block, self.order.span)))
            self.perm, self.block = self.order.block_permutation(self.partition, block), block
        return self.items[int(self.perm[within])]

    def _raw(self, start: int, stop: int) -> Iterator[dict[str, Any] | None]:
        position = start
        for shard, offset, count in list(self.order.segments(self.partition, start, stop)):
            if self.at != (shard, offset):
                self._open(shard, offset, position)
            assert self.stream is not None
            for _ in range(count):
                yield next(self.stream, None)
            self.at, position = (shard, offset + count), position + count

    def _open(self, shard: int, offset: int, position: int) -> None:
        """Open a shard (through the node cache when there is one) and pass over `offset` raw samples.

        The partition's next shards start downloading into the node cache meanwhile.
        """
        self.close()
        url = self.plan.opener.local(self.plan.urls[shard], self.on_error)
        upcoming = itertools.islice(self.order.segments(self.partition, position, self.order.span), 1,
                                    1 + self.plan.opener.prefetch_count)
        self.plan.opener.prefetch([self.plan.urls[s] for s, _, _ in upcoming])
        self.stream = (shard_samples(url, self.on_error, self.order.counts[shard], self.plan.opener.open)
                       if url else iter(()))
        for _ in range(offset):  # raw bytes only, never decoded
            if next(self.stream, None) is None:
                break

    def close(self) -> None:
        if self.stream is not None and hasattr(self.stream, "close"):
            self.stream.close()  # type: ignore[union-attr]
        self.stream = None


class RankBatches:
    """One DataLoader worker's batches of one rank: decode, replace bad samples, augment, assemble."""

    def __init__(self, plan: TrainPlan) -> None:
        self.plan, self.order = plan, plan.order()
        self.shard_errors = SkipLog("training")
        self.readers: dict[int, PartitionReader] = {}
        self.seen = self.bad = 0
        self.spare: Item | None = None  # a good sample of an earlier batch, for a batch with none
        self.retries = retries_so_far()

    def batches(self, indices: Iterable[int]) -> Iterator[dict[str, Any]]:
        try:
            for index in indices:
                yield self.batch(index)
        finally:
            self.close()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def following(self, plan: TrainPlan) -> RankBatches:
        """The same worker's batches of another epoch: its skip log, retry count and spare sample carry
        over (an all-bad first batch of the epoch then needs no failure), the damage budget starts afresh."""
        self.close()
        after = RankBatches(plan)
        after.shard_errors, after.retries, after.spare = self.shard_errors, self.retries, self.spare
        return after

    def batch(self, index: int) -> dict[str, Any]:
        p = self.plan
        places = [self.order.slot(index, s) for s in rank_slots(p.batch_size * p.world_size, p.world_size, p.rank)]
        items = [self._item(part, pos) for part, pos in places]
        good = [item for item in items if item is not None]
        self.seen, self.bad = self.seen + len(items), self.bad + len(items) - len(good)
        if self.bad * 2 > self.seen and self.seen >= 2 * p.batch_size:
            raise DataError(f"{self.bad} of the {self.seen} training samples read so far are damaged or "
                            "unreachable; most of the training data is gone (see the warnings above)")
        if not good and self.spare is None:
            raise DataError(f"all {len(items)} samples of the first training batch of this reader are damaged or "
                            "unreachable (see the warnings above); the training shards look unusable")
        skipped = len(items) - len(good)
        good = good or [self.spare]  # type: ignore[list-item]
        self.spare = good[-1]
        batch = BatchBuffer(p.batch_size, p.normalizer.norm)
        for n, ((part, pos), item) in enumerate(zip(places, items)):
            key, image, label, weight, bounds = item if item is not None else good[n % len(good)]
            _add_augmented(batch, p, part, pos, key, image, label, weight, bounds)
        retries = retries_so_far()
        out = batch.tensors(skipped)
        out["retries"], self.retries = torch.tensor(retries - self.retries, dtype=torch.int64), retries
        return out

    def _item(self, partition: int, position: int) -> Item | None:
        reader = self.readers.get(partition)
        if reader is None:
            reader = self.readers[partition] = PartitionReader(self.order, partition, self.plan, self.shard_errors)
        sample = reader.get(position)
        if sample is None:
            return None
        try:
            image, label, weight = _decode(sample, self.plan.num_classes, self.plan.weights)
            if image.shape != self.plan.shape:
                raise BadSample(f"sample {sample['__key__']}: image {image.shape} is not the dataset's {self.plan.shape}")
            bounds = self.plan.normalizer.bounds(sample)  # the percentiles of the tile's whole source frame
        except BadSample as exc:
            self.shard_errors(str(sample.get("__url__")), str(exc))
            return None
        return sample["__key__"], image, label, weight, bounds


def _add_augmented(batch: BatchBuffer, plan: TrainPlan, partition: int, position: int, key: str,
                   image: np.ndarray, label: np.ndarray, weight: np.ndarray | None,
                   bounds: np.ndarray | None) -> None:
    """Geometry on the raw tile, normalisation, then intensity changes; all seeded by the sample's place."""
    aug = plan.augment
    if not aug.enabled:
        batch.add(key, image, label, weight, bounds)
        return
    rng = sample_rng(plan.seed, 0, partition, plan.epoch, position)
    code = augment_code(plan.seed, 0, partition, plan.epoch, position)
    if aug.device != "cpu":  # the trainer resamples the batch on its device (unetdist.data.augment_batch)
        drawn = pack_draw(draw_spatial(rng, aug, code, label), aug.elastic_grid)
        batch.add(key, image, label, weight, bounds, post=lambda out: intensity(rng, aug, out), spatial=drawn)
        return
    image, label, weight = spatial(rng, aug, code, image, label, weight, copy=False)
    batch.add(key, image, label, weight, bounds, post=lambda out: intensity(rng, aug, out))


class TrainStream(IterableDataset):
    """One rank's epoch; DataLoader worker w builds batches start + w, start + w + workers, ..."""

    def __init__(self, plan: TrainPlan) -> None:
        self.plan = plan

    def __len__(self) -> int:
        return self.plan.order().steps - self.plan.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        indices = range(self.plan.start_batch + worker, self.plan.order().steps, workers)
        return RankBatches(self.plan).batches(indices)


class RunStream(IterableDataset):
    """One rank's batches of global steps [start, stop) of the run, epoch after epoch, in one pass.

    Step g is batch b of epoch e with (e, b) = divmod(g, batches per epoch): the same batch as
    `TrainStream` of epoch e gives. Worker w builds steps start + w, start + w + workers, ...; on
    reaching a new epoch it plans that epoch's order and readers afresh (as a new `TrainStream`
    would, damaged-sample budget included), so the worker processes live for the whole run. Only
    a batch whose samples are all damaged may differ: it is filled from the worker's last good
    sample, which depends on which worker built which batch before it, with per-epoch loaders too.
    """

    def __init__(self, plan: TrainPlan, start: int, stop: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        return self._batches(range(self.start + worker, self.stop, workers))

    def _batches(self, steps: Iterable[int]) -> Iterator[dict[str, Any]]:
        per_epoch = self.plan.order().steps  # the same every epoch: it depends on sample counts only
        current: RankBatches | None = None
        try:
            for step in steps:
                epoch, index = divmod(step, per_epoch)
                if current is None or current.plan.epoch != epoch:
                    plan = replace(self.plan, epoch=epoch, start_batch=index)
                    current = RankBatches(plan) if current is None else current.following(plan)
                yield current.batch(index)
        finally:
            if current is not None:
                current.close()


def val_assignment(shards: int, slots: int, slot: int) -> list[tuple[int, int, int]]:
    """(shard index, modulus, remainder): slot `slot` reads the samples i of the shard with i % modulus == remainder."""
    if shards >= slots:
        return [(s, 1, 0) for s in range(slot, shards, slots)]
    shard = slot % shards
    return [(shard, len(range(shard, slots, shards)), slot // shards)]


class ValStream(IterableDataset):
    """One rank's share of the validation tiles, in a fixed order, without augmentation."""

    def __init__(self, manifest: Manifest, normalizer: Normalizer, batch_size: int, rank: int, world_size: int,
                 lanes: int, opener: ShardOpener) -> None:
        self.opener = opener
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
        slot = self.rank * self.lanes + _worker()[0]
        for shard, modulus, remainder in val_assignment(len(self.urls), self.world_size * self.lanes, slot):
            expected = self.counts[shard] if self.counts else None
            report: ErrorCallback = skips if remainder == 0 else _ignore  # a shard's readers report it once
            url = self.opener.local(self.urls[shard], report)
            samples = shard_samples(url, report, expected, self.opener.open) if url else iter(())
            for index, sample in enumerate(samples):
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
    """Exactly `batches_per_epoch(...) - start_batch` training batches for this rank: one epoch.

    Batches are described in the module docstring (crops of `data.augment.crop` when set). The same
    arguments give the same batches; `start_batch=k` gives the unbroken epoch's batches from k on,
    and the rank batches of any world size with the same global batch concatenate to the same ones.
    Its workers end with the epoch; training uses `run_loader`, whose workers serve every epoch.
    """
    plan = _train_plan(data, manifest, rank=rank, world_size=world_size, seed=seed, epoch=epoch)
    total = batches_per_epoch(data, manifest, world_size)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}] (batches per epoch), got {start_batch}")
    return _loader(TrainStream(replace(plan, start_batch=start_batch)), data.workers, pin_memory)


def run_loader(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int, seed: int, stop_step: int,
               start_step: int = 0, pin_memory: bool = False) -> Iterable[dict[str, Any]]:
    """This rank's training batches of steps start_step .. stop_step - 1, across epochs: one DataLoader per run.

    Step g gives batch b of `train_loader(..., epoch=e)` with (e, b) = divmod(g, batches_per_epoch(...)),
    so the batches are those of the per-epoch loaders laid end to end, and resuming at any step
    decodes no skipped sample. Iterate it once: its worker processes start once and live until
    `stop_step`, reading the next epoch's first shuffle blocks while the current epoch's last batches
    train, instead of a fresh set of processes refilling them at every epoch.
    """
    if not 0 <= start_step <= stop_step:
        raise ValueError(f"need 0 <= start_step <= stop_step, got {start_step} and {stop_step}")
    plan = _train_plan(data, manifest, rank=rank, world_size=world_size, seed=seed, epoch=0)
    return _loader(RunStream(plan, start_step, stop_step), data.workers, pin_memory)


def _train_plan(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int, seed: int,
                epoch: int) -> TrainPlan:
    """Check the training data and layout (clear errors at start) and plan one rank's stream of `epoch`."""
    _check_rank(rank, world_size)
    _check_shards(manifest.train_shards, manifest.train_samples, "training", manifest.root)
    augment = as_augment_config(data.augment)
    if augment.enabled and augment.crop > manifest.tile:
        raise DataError(f"data.augment.crop={augment.crop} is larger than the tiles ({manifest.tile} px) "
                        f"of the dataset in {manifest.root}")
    if not manifest.train_shard_samples:
        raise DataError("the training sample order needs each shard's sample count: data.train_urls names "
                        f"shards that are not in the manifest of {manifest.root}; list shards of the manifest")
    partitions = partitions_for(data, manifest, world_size)
    check_layout(data.batch_size * world_size, world_size, partitions)
    return TrainPlan(urls=list(manifest.train_shards), counts=list(manifest.train_shard_samples),
                     normalizer=Normalizer.of(data, manifest),
                     batch_size=data.batch_size, world_size=world_size, rank=rank, partitions=partitions,
                     shuffle_buffer=data.shuffle_buffer, augment=augment, num_classes=manifest.num_classes,
                     shape=(manifest.channels, manifest.tile, manifest.tile), weights=manifest.weights, seed=seed,
                     epoch=epoch, start_batch=0, opener=ShardOpener.from_config(data))


def val_loader(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int,
               pin_memory: bool = False) -> Iterable[dict[str, Any]]:
    """This rank's share of the validation tiles (every tile once across all ranks and workers).

    Batches are like `train_loader`'s, the last one of each worker possibly smaller; a rank may get none.
    Each validation builds its own loader, whose workers end with it: a validation pass is short, and
    its workers hold no shuffle buffer.
    """
    _check_rank(rank, world_size)
    _check_shards(manifest.val_shards, manifest.val_samples, "validation", manifest.root)
    dataset = ValStream(manifest, Normalizer.of(data, manifest), data.batch_size, rank, world_size,
                        max(1, data.workers), ShardOpener.from_config(data))
    return _loader(dataset, data.workers, pin_memory)
