"""Benchmark sizes per machine: what `unetdist bench --preset NAME` measures.

Why this module exists: one table, three scales. ``gpu`` is the GPU measurement (the default
31 M-parameter model on 512x512 tiles); ``cpu`` is the same table at a size a 2-core CPU runs in
a few minutes (base width 16, 128x128 tiles: one fp32 step of the 512x512 default model takes
tens of seconds there); ``tiny`` is the CI smoke test (seconds per section, figures meaningless
beyond being positive). The memory-headroom section always uses the default model at 512x512:
on CPU it is computed on the meta device (shapes only), so its size costs nothing.

The CPU presets load data in the training process (``workers=0``): on a 2-core machine loader
processes take the cores the step computes on, and while one trainer's rounds are timed the
other trainer's idle workers would keep prefetching on them. Data time is then simply part of
each end-to-end step. The GPU preset uses 8 workers per trainer (16 cores feed one GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from unetdist.config import UsageError


@dataclass(frozen=True)
class Preset:
    """Sizes and step counts of one benchmark run.

    Attributes:
        name: preset name.
        base_width: model width at full resolution (depth is 4, as the reference).
        tile: tile side in pixels (data and every timed row).
        batch: per-device batch of every timed row.
        images, image_size: synthetic source images and their side (tiles are cut from them).
        warmup, steps: untimed and timed steps of each lever row.
        rounds, round_steps: the trainer comparison alternates reference/ours ``rounds`` times,
            ``round_steps`` timed steps each (after ``warmup`` untimed ones).
        workers: DataLoader workers for both trainers' end-to-end rows.
        ddp_steps: timed steps of each DDP row.
        memory_width, memory_tile: model width and tile of the memory-headroom section.
        memory_budget_gb: memory budget of that section when the device gives none (CPU).
        smoke_steps: steps of the `bench smoke` loss-falls check.
        ddp_options: time each DDP option on 2 processes too (off in the CI preset: 4 more spawns).
        threads: torch threads of the rows timed in this process (0: torch's default). The CPU presets
            use 1, so that each row's CPU seconds per step (``cpu_s``, ``ratio_cpu``) are per core and
            do not depend on other jobs: with 2 threads on a loaded 2-core machine, a step waits until
            both threads get a core at every parallel region, and wall-clock measures the neighbours.
    """

    name: str
    base_width: int
    tile: int
    batch: int
    images: int
    image_size: int
    warmup: int
    steps: int
    rounds: int
    round_steps: int
    workers: int
    ddp_steps: int
    memory_width: int = 64
    memory_tile: int = 512
    memory_budget_gb: float = 80.0
    smoke_steps: int = 50
    ddp_options: bool = True  # also time each DDP option (parallel.*) on 2 processes
    threads: int = 0  # torch threads of the timed rows (0: torch's default)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", base_width=4, tile=32, batch=4, images=6, image_size=64, warmup=1, steps=3,
                   rounds=4, round_steps=3, workers=0, ddp_steps=3, ddp_options=False, threads=1),
    "cpu": Preset("cpu", base_width=16, tile=128, batch=8, images=32, image_size=256, warmup=2, steps=8,
                  rounds=4, round_steps=4, workers=0, ddp_steps=6, threads=1),
    "gpu": Preset("gpu", base_width=64, tile=512, batch=8, images=24, image_size=1024, warmup=5, steps=20,
                  rounds=3, round_steps=10, workers=8, ddp_steps=20),
}


def resolve_preset(name: str, device: torch.device, **overrides: int | float | None) -> Preset:
    """The named preset (``auto``: ``gpu`` on CUDA, ``cpu`` otherwise) with non-None overrides applied."""
    if name == "auto":
        name = "gpu" if device.type == "cuda" else "cpu"
    if name not in PRESETS:
        raise UsageError(f"unknown bench preset {name!r}; choose one of auto, {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - {f.name for f in dataclasses.fields(Preset)}
    if unknown:
        raise ValueError(f"unknown preset field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(PRESETS[name], **changes)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device
