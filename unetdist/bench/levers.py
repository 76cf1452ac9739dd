"""Each performance lever of our trainer alone and together, on one fixed batch.

Why this module exists: a user choosing settings needs to see what each one buys on their
machine: fp32 vs bf16 autocast, channels_last, each activation-checkpointing policy,
torch.compile (GPU), and all speed levers together, with and without full checkpointing (the
price of the larger batch that checkpointing allows). Every row times ``Trainer.train_step`` on
the same real batch, so data loading is out of these figures (the comparison section has it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from unetdist.bench.data import Lever, bench_config, build_our_trainer, single_env
from unetdist.bench.presets import Preset
from unetdist.bench.rows import make_row
from unetdist.bench.timing import MemoryProbe, StepTimes, free_memory, run_steps

log = logging.getLogger(__name__)


def best_lever(device: torch.device, compile_ok: bool) -> Lever:
    """What we recommend on this device: GPU bf16 + channels_last (+ compile); CPU our default
    configuration (fp32, channels_last; docs/performance.md has the measurements behind it)."""
    if device.type == "cuda":
        return Lever(precision="bf16", channels_last=True, compile=compile_ok)
    return Lever()


def lever_list(device: torch.device, compile_ok: bool) -> list[Lever]:
    """The default, each lever alone and all speed levers together, without and with checkpointing.

    Ordered by what a time-limited run (the GPU check) must not lose: the default, precision,
    layout, everything together and its full-checkpointing price come first.
    """
    together = Lever(precision="bf16", channels_last=True, compile=compile_ok)
    levers = [Lever(), Lever(precision="bf16"), Lever(channels_last=not Lever().channels_last), together,
              dataclasses.replace(together, checkpointing="all"),
              Lever(checkpointing="highres"), Lever(checkpointing="all")]
    if compile_ok:
        levers.append(Lever(compile=True))
    levers.append(dataclasses.replace(together, checkpointing="highres"))
    return list(dict.fromkeys(levers))  # without repeats: the default may equal a lever


def compile_available(device: torch.device) -> tuple[bool, str]:
    """torch.compile rows run on CUDA only: CPU inductor builds C++ kernels for minutes on small machines."""
    if device.type != "cuda":
        return False, "torch.compile rows run on GPU only (CPU inductor compilation takes minutes here)"
    return True, ""


def run_lever(lever: Lever, preset: Preset, data_root: Path, run_dir: Path, device: torch.device,
              batch: dict[str, Any]) -> dict[str, Any]:
    """One row: build our trainer with ``lever``, warm up (memory measured), time ``preset.steps`` steps."""
    times, probe = _time_lever(lever, preset, data_root, run_dir, device, batch)
    row = make_row(
        f"ours {lever.label}", group="levers", mode="compute", times=times, batch=preset.batch, tile=preset.tile,
        base_width=preset.base_width, precision=lever.precision, channels_last=lever.channels_last,
        checkpointing=lever.checkpointing, compile=lever.compile, device=device, memory_gb=probe.gb,
        memory_method=probe.method,
    )
    free_memory(device)  # the row's trainer is gone with _time_lever's frame
    return row


def _time_lever(lever: Lever, preset: Preset, data_root: Path, run_dir: Path, device: torch.device,
                batch: dict[str, Any]) -> tuple[StepTimes, MemoryProbe]:
    cfg = bench_config(preset, data_root, run_dir, lever)
    trainer = build_our_trainer(cfg, single_env(device), lever)
    probe = MemoryProbe(device, trainer.module)
    times = run_steps(lambda: trainer.train_step(batch), device, max(1, preset.warmup), preset.steps, probe=probe)
    return times, probe


def run_levers(preset: Preset, data_root: Path, run_dir: Path, device: torch.device, batch: dict[str, Any],
               skipped: list[dict[str, str]], on_row: Any = None,
               deadline: float | None = None) -> list[dict[str, Any]]:
    """Every lever row; a row that fails (e.g. a compile error, out of memory) is recorded in ``skipped``,
    and so is every row not started before ``deadline`` (a ``time.perf_counter()`` value)."""
    compile_ok, reason = compile_available(device)
    if not compile_ok:
        skipped.append({"row": "ours compile", "reason": reason})
    rows = []
    for lever in lever_list(device, compile_ok):
        if deadline is not None and time.perf_counter() > deadline:
            skipped.append({"row": f"ours {lever.label}", "reason": "time budget (--deadline-s) spent"})
            continue
        try:
            row = run_lever(lever, preset, data_root, run_dir, device, batch)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # compile and OOM errors are RuntimeErrors
            log.warning("lever %s failed: %s", lever.label, exc)
            skipped.append({"row": f"ours {lever.label}", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
            free_memory(device)
            continue
        log.info("%-40s step %.4f s  %.1f img/s  MFU %.3f", row["name"], row["step_s"],
                 row["images_per_s_per_device"], row["mfu"])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
