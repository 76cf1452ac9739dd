"""Memory headroom: the largest batch of 512x512 tiles that fits a memory budget, per checkpointing policy.

Why this module exists: "how large a batch fits" decides the checkpointing policy, and it must
come from measurement, not from a guess at activation sizes.

* GPU: real allocations. Per policy, one training step at two small batches gives the peak
  ``max_memory_allocated`` as ``fixed + per_sample x batch``; the predicted largest batch within
  the budget is then run for real (stepping down 10% while it runs out of memory or exceeds the
  budget), and its measured peak is reported.
* CPU (or ``--memory-method meta``): the bytes autograd saves for backward, counted per storage on
  the meta device (shapes only, no arithmetic, so the 31 M-parameter model at 512x512 costs
  milliseconds), at batch 1 and 2, plus parameters, gradients and two AdamW states. Transient
  buffers during backward and allocator fragmentation are not in this count: it is a lower bound
  on what a device needs, and the ratio between policies is what it is for.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from unetdist.bench.data import Lever, bench_config, build_our_trainer, single_env
from unetdist.bench.presets import Preset
from unetdist.bench.timing import GIB, SavedTensorBytes, free_memory, state_bytes, sync
from unetdist.parallel.checkpointing import POLICIES, apply_activation_checkpointing
from unetdist.model import UNet

log = logging.getLogger(__name__)


def saved_bytes_meta(base_width: int, tile: int, batch: int, policy: str) -> tuple[int, int]:
    """(saved-for-backward bytes, parameter/gradient/optimizer-state bytes) of one fp32 step, on meta."""
    from unetdist.train.metrics import segmentation_loss

    with torch.device("meta"):
        model = UNet(in_channels=1, num_classes=2, base_width=base_width, depth=4)
        x = torch.randn(batch, 1, tile, tile)
        target = torch.randint(0, 2, (batch, tile, tile))
    apply_activation_checkpointing(model, policy)
    model.train()
    with SavedTensorBytes(model) as saved:
        segmentation_loss(model(x), target, 1.0)
    return saved.bytes, state_bytes(model)


def _fit(budget: float, fixed: float, per_sample: float) -> int:
    return max(0, math.floor((budget - fixed) / per_sample))


def headroom_meta(preset: Preset, budget_gb: float) -> dict[str, Any]:
    """Largest batch per policy from saved-tensor bytes (see the module docstring)."""
    budget = budget_gb * GIB
    policies: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        one, states = saved_bytes_meta(preset.memory_width, preset.memory_tile, 1, policy)
        two, _ = saved_bytes_meta(preset.memory_width, preset.memory_tile, 2, policy)
        per_sample = two - one
        fixed = states + (one - per_sample)
        policies[policy] = {"max_batch": _fit(budget, fixed, per_sample), "per_sample_gb": per_sample / GIB,
                            "fixed_gb": fixed / GIB}
    return _summary("saved-for-backward bytes on the meta device + 4 x parameter bytes (fp32)", "fp32",
                    preset, budget_gb, policies)


def _summary(method: str, precision: str, preset: Preset, budget_gb: float,
             policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method, "precision": precision, "tile": preset.memory_tile,
                           "base_width": preset.memory_width, "budget_gb": budget_gb, "policies": policies}
    none = policies["none"]["max_batch"]
    for policy in POLICIES[1:]:
        out[f"ratio_{policy}_vs_none"] = policies[policy]["max_batch"] / none if none else float("inf")
    return out


def _peak_step(trainer: Any, device: torch.device, batch: int, tile: int) -> float | None:
    """Peak bytes of one training step at ``batch`` (None: out of memory)."""
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        trainer.train_step({"image": torch.randn(batch, 1, tile, tile, device=device),
                            "label": torch.randint(0, 2, (batch, tile, tile), device=device)})
        sync(device)
    except torch.cuda.OutOfMemoryError:
        return None
    return float(torch.cuda.max_memory_allocated(device))


def headroom_cuda(preset: Preset, data_root: Path, run_dir: Path, device: torch.device, budget_gb: float,
                  lever: Lever) -> dict[str, Any]:
    """Largest batch per policy from real steps on the GPU (see the module docstring)."""
    budget = budget_gb * GIB
    sized = dataclasses.replace(preset, base_width=preset.memory_width, tile=preset.memory_tile)
    policies: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        row_lever = dataclasses.replace(lever, checkpointing=policy, compile=False)
        trainer = build_our_trainer(bench_config(sized, data_root, run_dir, row_lever), single_env(device), row_lever)
        _peak_step(trainer, device, 1, sized.tile)  # optimizer states exist from here on
        low, high = _peak_step(trainer, device, 2, sized.tile), _peak_step(trainer, device, 4, sized.tile)
        if low is None or high is None:
            policies[policy] = {"max_batch": 0, "error": "batch 4 does not fit"}
            del trainer
            free_memory(device)
            continue
        per_sample = (high - low) / 2
        fixed = low - 2 * per_sample
        batch, peak = max(1, _fit(budget, fixed, per_sample)) if per_sample > 0 else 4, None
        for _ in range(8):
            peak = _peak_step(trainer, device, batch, sized.tile)
            if (peak is not None and peak <= budget) or batch <= 1:
                break
            batch = max(1, int(batch * 0.9))
        fits = peak is not None and peak <= budget
        policies[policy] = {"max_batch": batch if fits else 0, "per_sample_gb": per_sample / GIB,
                            "fixed_gb": fixed / GIB, "verified_peak_gb": (peak or 0.0) / GIB}
        log.info("memory headroom %s: batch %d fits %.1f GB (peak %.1f GB)", policy, batch, budget_gb,
                 (peak or 0.0) / GIB)
        del trainer
        free_memory(device)
    return _summary("cuda max_memory_allocated of real steps", lever.precision, sized, budget_gb, policies)


def default_budget_gb(device: torch.device, preset: Preset) -> float:
    """GPU: 92% of its memory (the CUDA context and allocator fragmentation need the rest); CPU: the preset's."""
    if device.type == "cuda":
        return 0.92 * torch.cuda.get_device_properties(device).total_memory / GIB
    return preset.memory_budget_gb
