"""Our trainer against the reference trainer, on the same tiles, timed alternately in one process.

Why this module exists: a ratio measured minutes apart on a shared machine measures the
neighbours as much as the trainers. Here every contender is built first, warmed up, and then
the timed steps alternate in rounds (the order rotates every round, so a slow spell hits each
contender alike), and each figure is the median of its timed steps.

Two modes, each a ratio:

* ``end_to_end``: each trainer reads its own data pipeline (ours: WebDataset shards with our
  normalisation and augmentation; the reference: one PNG pair per tile through its map-style
  Dataset), the step time including the wait for the batch;
* ``compute``: each repeats one batch already in memory, isolating the training step
  (model layout, loss, optimizer, AMP) from data loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetdist.bench.data import BenchData, Lever, bench_config, build_our_trainer, single_env
from unetdist.bench.presets import Preset
from unetdist.bench.reference import ReferenceTrainer, endless, reference_loader
from unetdist.bench.rows import make_row, ratio
from unetdist.bench.timing import MemoryProbe, StepTimes, free_memory, run_steps

log = logging.getLogger(__name__)


@dataclass
class Contender:
    """One trainer in the comparison, with its two batch sources."""

    name: str
    trainer: str  # "ours" | "reference"
    lever: Lever
    model: nn.Module
    step: Callable[[Any], Any]
    stream: Iterator[Any]
    fixed: Any
    close: Callable[[], None]


def _ours(preset: Preset, data: BenchData, run_dir: Path, device: torch.device, lever: Lever) -> Contender:
    from unetdist.bench.data import our_batches

    cfg = bench_config(preset, data.root, run_dir, lever)
    trainer = build_our_trainer(cfg, single_env(device), lever)
    stream = our_batches(cfg, device)
    fixed = next(stream)
    return Contender(f"ours {lever.label}", "ours", lever, trainer.module, trainer.train_step, stream, fixed,
                     stream.close)


def _reference(preset: Preset, data: BenchData, device: torch.device, amp: bool) -> Contender:
    ref = ReferenceTrainer(n_channels=1, n_classes=2, base_width=preset.base_width, device=device, amp=amp)
    loader = reference_loader(data.reference_dir, preset.batch, preset.workers, pin_memory=device.type == "cuda")
    stream = endless(loader)
    fixed = next(stream)
    # Upstream's --amp is torch.autocast's default dtype: fp16 on CUDA (with a GradScaler), bf16 on CPU.
    precision = ("fp16" if device.type == "cuda" else "bf16") if amp else "fp32"
    lever = Lever(precision=precision, channels_last=True)
    name = "reference --amp" if amp else "reference"
    return Contender(name, "reference", lever, ref.model, ref.train_step, stream, fixed, stream.close)


def contenders(preset: Preset, data: BenchData, run_dir: Path, device: torch.device, ours: Lever) -> list[Contender]:
    """The reference as upstream runs it (fp32; on GPU also with --amp), then ours in our default
    configuration and, when ``ours`` (the device's recommendation) differs from it, with ``ours`` too."""
    found = [_reference(preset, data, device, amp=False)]
    if device.type == "cuda":
        found.append(_reference(preset, data, device, amp=True))
    found.append(_ours(preset, data, run_dir, device, Lever()))
    if ours != Lever():
        found.append(_ours(preset, data, run_dir, device, ours))
    return found


def _rows(entrants: list[Contender], times: dict[tuple[str, str], StepTimes], memory: dict[str, MemoryProbe],
          preset: Preset, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for mode in ("end_to_end", "compute"):
        for c in entrants:
            rows.append(make_row(
                f"{c.name} [{mode}]", group="reference", mode=mode, times=times[(c.name, mode)], batch=preset.batch,
                tile=preset.tile, base_width=preset.base_width, precision=c.lever.precision,
                channels_last=c.lever.channels_last, checkpointing=c.lever.checkpointing, compile=c.lever.compile,
                device=device, memory_gb=memory[c.name].gb, memory_method=memory[c.name].method, trainer=c.trainer,
            ))
    return rows


def run_comparison(preset: Preset, data: BenchData, run_dir: Path, device: torch.device,
                   ours: Lever) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for every contender in both modes, and the ratios ours / reference."""
    entrants = contenders(preset, data, run_dir, device, ours)
    times: dict[tuple[str, str], StepTimes] = {}
    memory: dict[str, MemoryProbe] = {}
    try:
        for mode in ("end_to_end", "compute"):
            for c in entrants:
                times[(c.name, mode)] = StepTimes()
                probe = MemoryProbe(device, c.model) if mode == "end_to_end" else None
                if probe is not None:
                    memory[c.name] = probe
                _run(c, mode, device, preset.warmup, 0, times, probe)
            for round_index in range(preset.rounds):
                shift = round_index % len(entrants)
                for c in entrants[shift:] + entrants[:shift]:
                    _run(c, mode, device, 0, preset.round_steps, times)
                log.info("comparison %s: round %d/%d done", mode, round_index + 1, preset.rounds)
    finally:
        for c in entrants:
            c.close()
    rows = _rows(entrants, times, memory, preset, device)
    ratios = []
    for mine in (c for c in entrants if c.trainer == "ours"):
        for ref in (c for c in entrants if c.trainer == "reference"):
            for mode in ("end_to_end", "compute"):
                found = ratio(rows, f"{mine.name} [{mode}]", f"{ref.name} [{mode}]",
                              f"{mine.name} / {ref.name}, {mode.replace('_', ' ')} (images/s per device)")
                if found is not None:
                    ratios.append(found)
    del entrants
    free_memory(device)
    return rows, ratios


def _run(c: Contender, mode: str, device: torch.device, warmup: int, steps: int,
         times: dict[tuple[str, str], StepTimes], probe: MemoryProbe | None = None) -> None:
    if mode == "end_to_end":
        run_steps(c.step, device, warmup, steps, batches=c.stream, times=times[(c.name, mode)], probe=probe)
    else:
        run_steps(lambda: c.step(c.fixed), device, warmup, steps, times=times[(c.name, mode)], probe=probe)
