"""One row of the benchmark table: timings turned into throughput, FLOP/s and MFU.

Why this module exists: every section (trainer comparison, levers, DDP) reports the same
figures computed the same way, and the JSON schema test checks exactly these fields.
"""

from __future__ import annotations

from typing import Any

import torch

from unetdist.model.peak import peak_flops
from unetdist.bench.timing import StepTimes
from unetdist.model.flops import train_step_flops

# Figures every row carries; each must be a positive number (the CI smoke test asserts it).
FIGURES: tuple[str, ...] = (
    "step_s", "step_s_mean", "images_per_s_per_device", "megapixels_per_s_per_device", "images_per_s",
    "train_flops_per_step", "model_flops_per_step", "tflops_per_s_per_device", "mfu", "hfu", "peak_memory_gb",
)


def make_row(
    name: str,
    *,
    group: str,
    mode: str,
    times: StepTimes,
    batch: int,
    tile: int,
    base_width: int,
    precision: str,
    channels_last: bool,
    checkpointing: str,
    compile: bool,
    device: torch.device,
    memory_gb: float,
    memory_method: str,
    world_size: int = 1,
    trainer: str = "ours",
) -> dict[str, Any]:
    """A table row. ``mode``: ``end_to_end`` (data loading in the step time) or ``compute`` (fixed batch).

    Throughput is per device (``batch`` is per device); ``images_per_s`` is global (x world size).
    FLOPs are the analytic count of ``unetdist.model.flops`` (the reference's convolutions are
    the same): ``model_flops_per_step`` what the model needs (forward + backward), the numerator of
    MFU; ``train_flops_per_step`` adds activation checkpointing's recomputation, what the device
    executes, the numerator of HFU (hardware FLOP utilisation) and of ``tflops_per_s_per_device``.
    Both divide by :func:`peak_flops` for the precision the convolutions run in.
    """
    step = times.median
    flops = train_step_flops(tile, tile, batch, in_channels=1, num_classes=2, base_width=base_width, depth=4,
                             policy=checkpointing)
    model_flops = train_step_flops(tile, tile, batch, in_channels=1, num_classes=2, base_width=base_width, depth=4)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    achieved = flops / step
    row: dict[str, Any] = {
        "name": name, "trainer": trainer, "group": group, "mode": mode, "precision": precision,
        "channels_last": channels_last, "checkpointing": checkpointing, "compile": compile,
        "world_size": world_size, "batch_per_device": batch, "tile": tile, "steps_timed": len(times.seconds),
        "step_s": step, "step_s_mean": times.mean, "step_s_min": min(times.seconds), "step_s_max": max(times.seconds),
        "images_per_s_per_device": batch / step,
        "megapixels_per_s_per_device": batch * tile * tile / step / 1e6,
        "images_per_s": batch * world_size / step,
        "train_flops_per_step": flops,
        "model_flops_per_step": model_flops,
        "tflops_per_s_per_device": achieved / 1e12,
        "mfu": model_flops / step / peak_flops(device, dtype),
        "hfu": achieved / peak_flops(device, dtype),
        "peak_memory_gb": memory_gb, "memory_method": memory_method,
    }
    if mode == "end_to_end":
        row["data_wait_fraction"] = times.data_wait_fraction
    return row


def ratio(rows: list[dict[str, Any]], numerator: str, denominator: str, name: str,
          figure: str = "images_per_s_per_device") -> dict[str, Any] | None:
    """``numerator``'s figure over ``denominator``'s (rows by name), or None if either is missing.

    ``ratio`` compares medians; ``ratio_best`` the fastest steps (throughput ratio, same batch).
    """
    found = {r["name"]: r for r in rows}
    if numerator not in found or denominator not in found:
        return None
    # ratio_best: of the fastest steps, which on a shared machine are the least disturbed ones
    return {"name": name, "numerator": numerator, "denominator": denominator, "figure": figure,
            "ratio": found[numerator][figure] / found[denominator][figure],
            "ratio_best": found[denominator]["step_s_min"] / found[numerator]["step_s_min"]}
