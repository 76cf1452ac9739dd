"""How many loader workers and how deep a shuffle buffer one node can afford, from its cores and memory.

Why this module exists: every rank on a node runs `data.workers` loader processes, and each
worker holds `data.shuffle_buffer` raw samples. On a node of 8 GPUs, 8 workers per rank with a
2,000-sample buffer of 512 x 512 tiles is 64 processes on 32 cores and about 100 GB of buffers.
The arithmetic is pure (tested with the cores and memory of nodes we do not have); the run
checks its own node at start and says what would fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.25  # of the node's memory for shuffle buffers: the rest is for the training processes,
# pinned batches, the page cache of the shards and the OS
MAX_WORKERS = 8  # more rarely helps: one worker decodes a 512 x 512 tile in about a millisecond
MAX_BUFFER = 1000  # deeper mixes little better: lanes already read shards resampled at random


@dataclass(frozen=True)
class NodeResources:
    """What one node offers this job: cores it may run on, and memory in bytes."""

    cores: int
    memory_bytes: int


@dataclass(frozen=True)
class LoaderSizing:
    """Loader settings per rank, and what they cost on the node."""

    workers: int
    shuffle_buffer: int
    buffer_bytes_per_node: int


def sample_bytes(tile: int, channels: int, dtype: str = "uint16", weights: bool = False) -> int:
    """Bytes of one raw training sample in a shuffle buffer: image, uint8 labels, float16 weights."""
    per_pixel = channels * np.dtype(dtype).itemsize + 1 + (2 if weights else 0)
    return tile * tile * per_pixel


def size_loaders(node: NodeResources, ranks_per_node: int, sample: int) -> LoaderSizing:
    """Workers and shuffle buffer per rank that fit `node` with `ranks_per_node` training processes.

    Workers: the cores left after one per training process, shared by the ranks, at most
    MAX_WORKERS. Buffer: MEMORY_FRACTION of the node's memory over every worker of every rank,
    at most MAX_BUFFER samples (0: no shuffle buffer fits).
    """
    workers = max(0, min(MAX_WORKERS, (node.cores - ranks_per_node) // ranks_per_node))
    holders = ranks_per_node * max(1, workers)
    buffer = min(MAX_BUFFER, int(node.memory_bytes * MEMORY_FRACTION) // (holders * sample))
    return LoaderSizing(workers, buffer, holders * buffer * sample)


def loader_cost(ranks_per_node: int, workers: int, shuffle_buffer: int, sample: int) -> tuple[int, int]:
    """(processes, buffer bytes) the configured loaders use on one node."""
    return ranks_per_node * (1 + workers), ranks_per_node * max(1, workers) * shuffle_buffer * sample


def check_loaders(node: NodeResources, ranks_per_node: int, workers: int, shuffle_buffer: int,
                  sample: int, epoch_samples_per_worker: int | None = None) -> str | None:
    """A warning naming the keys and what would fit, when the configured loaders overload the node.

    `epoch_samples_per_worker`: what each worker yields per epoch. Each epoch's order starts a new
    shuffle block, filled before its first sample, so a deeper buffer reads more than the epoch trains on.
    """
    processes, buffers = loader_cost(ranks_per_node, workers, shuffle_buffer, sample)
    fits = size_loaders(node, ranks_per_node, sample)
    problems = []
    if epoch_samples_per_worker is not None and shuffle_buffer > max(epoch_samples_per_worker, 1):
        problems.append(f"data.shuffle_buffer={shuffle_buffer} is filled at every epoch start but each worker "
                        f"yields {epoch_samples_per_worker} samples per epoch (set at most that)")
        fits = LoaderSizing(fits.workers, min(fits.shuffle_buffer, epoch_samples_per_worker),
                            fits.buffer_bytes_per_node)
    if processes > node.cores:
        problems.append(f"{ranks_per_node} rank(s) x (1 + data.workers={workers}) = {processes} processes on "
                        f"{node.cores} cores")
    if buffers > node.memory_bytes * MEMORY_FRACTION:
        problems.append(f"shuffle buffers of {buffers / 1e9:.1f} GB ({ranks_per_node} rank(s) x {max(1, workers)} "
                        f"worker(s) x data.shuffle_buffer={shuffle_buffer} x {sample / 1e6:.2f} MB) on a node with "
                        f"{node.memory_bytes / 1e9:.0f} GB")
    if not problems:
        return None
    return (f"the data loaders overload this node: {'; '.join(problems)}. This node fits data.workers={fits.workers} "
            f"data.shuffle_buffer={fits.shuffle_buffer} ({fits.buffer_bytes_per_node / 1e9:.1f} GB of buffers)")



def warn_if_overloaded(ranks_per_node: int, workers: int, shuffle_buffer: int, sample: int,
                       epoch_samples_per_worker: int | None = None) -> str | None:
    """Check this node (call on rank 0 only) and log the warning, if any; returns it."""
    from unetdist.parallel.env import node_resources

    warning = check_loaders(node_resources(), ranks_per_node, workers, shuffle_buffer, sample,
                            epoch_samples_per_worker)
    if warning:
        log.warning("%s", warning)
    return warning
