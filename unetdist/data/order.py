"""The training sample order: a function of (seed, epoch) and fixed partitions, not of ranks or workers.

A requeued job may come back on more or fewer GPUs, or with another `data.workers`; its loss curve
should not notice. So, as in MosaicML Streaming's canonical nodes, the order is defined first and
only then cut among whoever reads it:

1. Each epoch the shards are put in an order drawn from (seed, epoch) and their samples laid end
   to end: N samples, padded to `steps * G` by wrapping around to the start (G = global batch,
   `steps` = ceil(N / G)), so every train tile comes once per epoch and at most G - 1 twice.
2. That sequence is cut into P contiguous partitions (`data.partitions`, G % P == 0), so each
   partition is a run of whole shards read sequentially. Within a partition, samples are shuffled
   in consecutive blocks (a permutation per block drawn from (seed, epoch, partition, block)): a
   reader holds one block of raw samples, never the whole shard list.
3. Global batch b is, for p = 0 .. P-1, the partition's samples b*c .. b*c + c - 1 (c = G / P).
   Rank r of W takes slots r*B .. r*B + B - 1 of it (B = G / W): with W dividing P, whole
   partitions, so each rank reads only its own shards.

Everything here is index arithmetic on sample counts; `unetdist.data.stream` does the reading.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from unetdist.data.errors import DataError


def _seed(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([p % 2**63 for p in parts])


def auto_partitions(global_batch: int, shards: int) -> int:
    """The largest divisor of the global batch that is at most the number of shards (at least 1)."""
    return max(d for d in range(1, global_batch + 1) if global_batch % d == 0 and d <= max(1, shards))


def per_device_batch(batch_size: int, global_batch: int, world_size: int, grad_accum: int = 1) -> int:
    """data.batch_size for this world size: `global_batch / world_size` when a global batch is set."""
    if global_batch <= 0:
        return batch_size
    if global_batch % world_size:
        raise DataError(f"data.global_batch={global_batch} is not divisible by the world size {world_size}; "
                        "pick a global batch that every node count you use divides")
    per_device = global_batch // world_size
    if per_device % grad_accum:
        raise DataError(f"data.global_batch={global_batch} gives {per_device} samples per device on {world_size} "
                        f"ranks, not divisible by train.grad_accum={grad_accum}")
    return per_device


def check_layout(global_batch: int, world_size: int, partitions: int) -> None:
    """Refuse, with the keys to change, a layout whose batches cannot be cut evenly."""
    if global_batch % world_size:
        raise DataError(f"the global batch {global_batch} is not divisible by the world size {world_size}")
    if partitions < 1 or global_batch % partitions:
        raise DataError(f"data.partitions={partitions} must divide the global batch {global_batch} "
                        "(data.batch_size x world size); pick a divisor of it, or 0 for automatic")


@dataclass(frozen=True)
class EpochOrder:
    """One epoch's sample order; see the module docstring."""

    counts: tuple[int, ...]  # samples per shard, manifest order
    shard_order: tuple[int, ...]  # shard indices in this epoch's order
    starts: tuple[int, ...]  # offset of each shard_order entry in the epoch sequence
    seed: int
    epoch: int
    partitions: int
    global_batch: int
    block: int  # shuffle block, samples

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def steps(self) -> int:
        return math.ceil(self.total / self.global_batch)

    @property
    def chunk(self) -> int:
        """Samples each partition gives each global batch."""
        return self.global_batch // self.partitions

    @property
    def span(self) -> int:
        """Samples in each partition this epoch (padding included)."""
        return self.steps * self.chunk

    def segments(self, partition: int, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard index, offset in shard, count) covering raw positions [start, stop) of a partition."""
        q, end = partition * self.span + start, partition * self.span + stop
        while q < end:
            wrapped = q % self.total
            k = int(np.searchsorted(self.starts, wrapped, side="right")) - 1
            offset = wrapped - self.starts[k]
            count = min(self.counts[self.shard_order[k]] - offset, end - q)
            yield self.shard_order[k], offset, count
            q += count

    def block_permutation(self, partition: int, block: int) -> np.ndarray:
        """Where each output position of a block comes from, relative to the block's start."""
        size = min(self.block, self.span - block * self.block)
        rng = np.random.default_rng(_seed(self.seed, self.epoch, partition, block, 0x0D3))
        return rng.permutation(size)

    def slot(self, batch: int, slot: int) -> tuple[int, int]:
        """(partition, output position in it) of slot `slot` of global batch `batch`."""
        partition, within = divmod(slot, self.chunk)
        return partition, batch * self.chunk + within

    def raw_position(self, partition: int, position: int) -> int:
        """The raw (unshuffled) partition position that output position `position` reads."""
        block, within = divmod(position, self.block)
        return block * self.block + int(self.block_permutation(partition, block)[within])


def epoch_order(counts: Sequence[int], *, seed: int, epoch: int, partitions: int, global_batch: int,
                shuffle_buffer: int) -> EpochOrder:
    """The order of `epoch`; `shuffle_buffer` raw samples in all are held by a reader of every partition."""
    if not counts or sum(counts) <= 0:
        raise DataError("the training shards hold no samples")
    order = np.random.default_rng(_seed(seed, epoch, 0x5A4D)).permutation(len(counts))
    starts = np.concatenate([[0], np.cumsum([counts[i] for i in order])[:-1]]).astype(np.int64)
    block = max(1, shuffle_buffer // partitions)
    return EpochOrder(counts=tuple(int(c) for c in counts), shard_order=tuple(int(i) for i in order),
                      starts=tuple(int(s) for s in starts), seed=seed, epoch=epoch, partitions=partitions,
                      global_batch=global_batch, block=block)


def rank_slots(global_batch: int, world_size: int, rank: int) -> range:
    """The slots of every global batch that rank `rank` trains on."""
    per_rank = global_batch // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)
