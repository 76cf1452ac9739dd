"""Step timing and memory measurement shared by every benchmark section.

Why this module exists: every row of the table must be measured the same way: wall-clock per
step with the device synchronised, the median of the timed steps after warm-up, and one memory
method per device (GPU: the caching allocator's peak; CPU: the bytes autograd keeps for backward
plus parameters, gradients and two optimizer states, because a process-wide RSS peak cannot be
attributed to one row).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

GIB = 2**30


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so wall-clock covers the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    """Wall-clock seconds of timed steps and the seconds of each spent waiting for data."""

    seconds: list[float] = field(default_factory=list)
    data_wait: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # CPU time of this process (all its threads)

    def add(self, seconds: float, data_wait: float = 0.0, cpu_seconds: float = 0.0) -> None:
        self.seconds.append(seconds)
        self.data_wait.append(data_wait)
        self.cpu_seconds.append(cpu_seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def data_wait_fraction(self) -> float:
        return min(1.0, sum(self.data_wait) / max(sum(self.seconds), 1e-12))


def time_step(step: Callable[..., Any], device: torch.device,
              batches: Iterator[Any] | None = None) -> tuple[float, float, float]:
    """Run one step and return (seconds, data-wait seconds, CPU seconds of this process); with ``batches``
    the step gets ``next(batches)``."""
    sync(device)
    cpu = time.process_time()
    start = time.perf_counter()
    wait = 0.0
    if batches is not None:
        batch = next(batches)
        wait = time.perf_counter() - start
        step(batch)
    else:
        step()
    sync(device)
    return time.perf_counter() - start, wait, time.process_time() - cpu


def run_steps(step: Callable[..., Any], device: torch.device, warmup: int, steps: int,
              batches: Iterator[Any] | None = None, times: StepTimes | None = None,
              probe: MemoryProbe | None = None) -> StepTimes:
    """``warmup`` untimed then ``steps`` timed steps, appended to ``times``.

    With ``probe``, the first warm-up step runs inside ``probe.first_step()`` (memory is measured
    there, never during timed steps, whose hooks would cost time).
    """
    times = times if times is not None else StepTimes()
    for index in range(warmup):
        with probe.first_step() if probe is not None and index == 0 else contextlib.nullcontext():
            time_step(step, device, batches)
    for _ in range(steps):
        times.add(*time_step(step, device, batches))
    return times


class SavedTensorBytes:
    """Counts the distinct storages autograd saves for backward inside the ``with`` block.

    Every tensor an op saves passes the pack hook, including the stage inputs that non-reentrant
    checkpoint keeps. A storage saved several times (an in-place ReLU's output saved by the ReLU
    and the next convolution, views of one base) counts once, keyed by its StorageImpl address
    (``_cdata``), which also works on the meta device where data pointers are all zero.
    Parameters are excluded: they are held whatever the policy.
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {p.untyped_storage()._cdata for p in model.parameters()}
        self._kept: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self._params:
            self._kept[storage._cdata] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._kept.values())


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Parameters + gradients + two optimizer states per parameter (AdamW; RMSprop with momentum)."""
    return 4 * parameter_bytes(model)


def free_memory(device: torch.device) -> None:
    """Drop garbage (previous rows' trainers) and, on GPU, the allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class MemoryProbe:
    """Peak memory of one row, measured over its first (warm-up) step, by the device's method.

    GPU: ``max_memory_allocated`` during the step above what was allocated before it, plus the
    model's parameters and buffers (allocated earlier), so several trainers alive in one process
    are each charged only their own memory. CPU: the bytes autograd saves for backward plus
    parameters, gradients and two optimizer states (see the module docstring).
    """

    def __init__(self, device: torch.device, model: nn.Module) -> None:
        self.device = device
        self.model = model
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else \
            "saved-for-backward bytes + 4 x parameter bytes"
        self._bytes = 0

    @contextlib.contextmanager
    def first_step(self) -> Iterator[None]:
        if self.device.type != "cuda":
            with SavedTensorBytes(self.model) as saved:
                yield
            self._bytes = saved.bytes + state_bytes(self.model)
            return
        sync(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        sync(self.device)
        resident = parameter_bytes(self.model) + sum(b.numel() * b.element_size() for b in self.model.buffers())
        self._bytes = torch.cuda.max_memory_allocated(self.device) - base + resident

    @property
    def gb(self) -> float:
        return self._bytes / GIB
