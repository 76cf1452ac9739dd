"""Loader workers and shuffle buffers sized from a node's cores and memory (nodes we do not have, as values)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO
from unetdist.config import load_config
from unetdist.parallel.node import NodeResources, check_loaders, loader_cost, sample_bytes, size_loaders

GB = 10**9


def test_sample_bytes() -> None:
    assert sample_bytes(512, 1, "uint16") == 512 * 512 * 3
    assert sample_bytes(256, 3, "float32", weights=True) == 256 * 256 * (12 + 1 + 2)


@pytest.mark.parametrize(("cores", "memory_gb", "ranks", "workers"), [
    (32, 256, 8, 3),     # the node slurm/train.sh asks for
    (128, 2048, 8, 8),   # a DGX: capped at 8 per rank
    (16, 128, 1, 8),
    (8, 64, 8, 0),       # one core per GPU: loading in the training processes
    (2, 24, 1, 1),
])
def test_workers_leave_a_core_per_training_process(cores: int, memory_gb: int, ranks: int, workers: int) -> None:
    sized = size_loaders(NodeResources(cores, memory_gb * GB), ranks, sample_bytes(512, 1))
    assert sized.workers == workers
    processes, buffers = loader_cost(ranks, sized.workers, sized.shuffle_buffer, sample_bytes(512, 1))
    assert processes <= max(cores, ranks) and buffers <= 0.25 * memory_gb * GB
    assert buffers == sized.buffer_bytes_per_node


def test_buffer_shrinks_with_memory_and_tile() -> None:
    big = size_loaders(NodeResources(32, 64 * GB), 8, sample_bytes(2048, 2, "float32"))  # 37.7 MB samples
    assert 0 < big.shuffle_buffer < 100 and big.buffer_bytes_per_node <= 16 * GB
    small = size_loaders(NodeResources(32, 512 * GB), 8, sample_bytes(128, 1))
    assert small.shuffle_buffer == 1000  # the cap


def test_the_old_gpu_config_is_refused_with_what_fits() -> None:
    warning = check_loaders(NodeResources(32, 256 * GB), 8, workers=8, shuffle_buffer=2000,
                            sample=sample_bytes(512, 1))
    assert warning is not None
    assert "8 rank(s) x (1 + data.workers=8) = 72 processes on 32 cores" in warning
    assert "shuffle buffers of 100.7 GB" in warning and "fits data.workers=3" in warning


def test_a_buffer_deeper_than_an_epoch_is_named() -> None:
    warning = check_loaders(NodeResources(32, 512 * GB), 8, 3, 256, sample_bytes(512, 1), epoch_samples_per_worker=20)
    assert warning is not None and "data.shuffle_buffer=256 is filled at every epoch start" in warning
    assert "data.shuffle_buffer=20 " in warning
    assert check_loaders(NodeResources(32, 512 * GB), 8, 3, 256, sample_bytes(512, 1), 5000) is None


def test_gpu_8x_config_fits_the_node_slurm_asks_for() -> None:
    script = (REPO / "slurm/train.sh").read_text()
    cores = int(re.search(r"#SBATCH --cpus-per-task=(\d+)", script).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", script).group(1))
    cfg = load_config(REPO / "configs/gpu-8x.yaml", [])
    sample = sample_bytes(cfg.data.shard.tile, cfg.model.in_channels, "uint16")
    sized = size_loaders(NodeResources(cores, 256 * GB), gpus, sample)
    assert cfg.data.workers == sized.workers
    assert check_loaders(NodeResources(cores, 256 * GB), gpus, cfg.data.workers, cfg.data.shuffle_buffer, sample) is None
