"""`unetdist bench smoke`: does training work on this device before we time it?

Why this module exists: a fast table from a broken step is worthless, and the GPU check runs
on machines we see for minutes. Two checks, on the device, in the precision we recommend there
(GPU: bf16 autocast + channels_last; CPU: fp32):

* the loss falls: ``smoke_steps`` steps of our trainer over a few real batches; the mean loss
  of the last 10 steps must be below 90% of the first 10's;
* activation checkpointing changes nothing but memory: one forward/backward per policy from
  the same weights and batch; loss, gradients and BatchNorm statistics must match the run
  without checkpointing within a tolerance that fits the precision (bf16 keeps 8 bits of
  mantissa: relative 2e-2; fp32: 1e-5), and ``num_batches_tracked`` must match exactly (the
  recomputation must not update BatchNorm a second time).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import logging
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetdist.data.progress import track
from unetdist.bench.data import Lever, bench_config, build_our_trainer, our_batches, prepare_data, single_env
from unetdist.bench.presets import Preset, resolve_device, resolve_preset
from unetdist.bench.report import machine_info, write_report
from unetdist.parallel.checkpointing import apply_activation_checkpointing
from unetdist.model import UNet

log = logging.getLogger(__name__)

SMOKE_SCHEMA = "unetdist.bench.smoke/1"
TOLERANCE = {"bf16": 2e-2, "fp32": 1e-5}


def loss_falls(preset: Preset, data_root: Path, run_dir: Path, device: torch.device, lever: Lever) -> dict[str, Any]:
    """Train ``preset.smoke_steps`` steps cycling 4 real batches; compare the first and last 10 losses."""
    cfg = bench_config(preset, data_root, run_dir, lever)
    stream = our_batches(cfg, device)
    batches = [{"image": b["image"], "label": b["label"]} for b in itertools.islice(stream, 4)]
    stream.close()
    trainer = build_our_trainer(cfg, single_env(device), lever)
    steps = track(range(preset.smoke_steps), preset.smoke_steps, "bench smoke", "step")
    losses = [float(trainer.train_step(batches[i % len(batches)])["loss"]) for i in steps]
    window = min(10, len(losses) // 2)
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    return {"steps": len(losses), "first_mean": first, "last_mean": last, "losses": losses,
            "passed": bool(last < 0.9 * first)}


def _step(model: nn.Module, image: torch.Tensor, label: torch.Tensor, dtype: torch.dtype | None,
          device: torch.device) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from unetdist.train.metrics import segmentation_loss

    model.train()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        logits = model(image)
    loss = segmentation_loss(logits, label, 1.0)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return float(loss.detach()), grads, buffers


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def checkpoint_equivalence(preset: Preset, batch: dict[str, Any], device: torch.device, lever: Lever) -> dict[str, Any]:
    """Each policy against no checkpointing (and no checkpointing against itself: the noise floor)."""
    precision = "bf16" if lever.precision != "fp32" else "fp32"
    tolerance = TOLERANCE[precision]
    dtype = lever.autocast_dtype if lever.precision != "fp32" else None
    torch.manual_seed(0)
    base = UNet(in_channels=1, num_classes=2, base_width=preset.base_width, depth=4).to(device)
    if lever.channels_last:
        base = base.to(memory_format=torch.channels_last)
    image = batch["image"].to(device)
    image = image.contiguous(memory_format=torch.channels_last) if lever.channels_last else image
    label = batch["label"].to(device)
    reference = _step(copy.deepcopy(base), image, label, dtype, device)
    results: dict[str, Any] = {"precision": precision, "tolerance": tolerance}
    for policy in ("none", "highres", "all"):
        loss, grads, buffers = _step(apply_activation_checkpointing(copy.deepcopy(base), policy), image, label,
                                     dtype, device)
        stats = [n for n in buffers if not n.endswith("num_batches_tracked")]
        counts = [n for n in buffers if n.endswith("num_batches_tracked")]
        entry = {
            "loss_rel_diff": abs(loss - reference[0]) / max(abs(reference[0]), 1e-12),
            "grad_rel_l2": _rel(torch.cat([g.flatten() for g in grads.values()]),
                                torch.cat([g.flatten() for g in reference[1].values()])),
            "grad_max_tensor_rel": max(_rel(grads[n], reference[1][n]) for n in grads),
            "bn_stats_max_rel": max(_rel(buffers[n], reference[2][n]) for n in stats),
            "bn_counts_equal": all(torch.equal(buffers[n], reference[2][n]) for n in counts),
        }
        entry["passed"] = bool(entry["loss_rel_diff"] <= tolerance and entry["grad_rel_l2"] <= tolerance
                               and entry["bn_stats_max_rel"] <= tolerance and entry["bn_counts_equal"])
        results[policy if policy != "none" else "none_vs_none"] = entry
    results["passed"] = all(results[p]["passed"] for p in ("none_vs_none", "highres", "all"))
    return results


def run_smoke(args: argparse.Namespace) -> dict[str, Any]:
    """Both checks; the report is written to ``OUT/smoke.json`` and returned."""
    from unetdist.bench.levers import best_lever
    from unetdist.bench.run import default_data_dir

    device = resolve_device(args.device)
    preset = resolve_preset(args.preset, device, base_width=args.width, tile=args.tile, batch=args.batch_size,
                            smoke_steps=args.steps)
    out = Path(args.out) if args.out else Path("runs") / "bench" / preset.name
    data_root = Path(args.data_dir) if args.data_dir else default_data_dir(preset)
    run_dir = out / "run"
    lever = best_lever(device, compile_ok=False)
    prepare_data(preset, data_root, run_dir)
    report: dict[str, Any] = {"schema": SMOKE_SCHEMA, "preset": preset.name, "machine": machine_info(device),
                              "lever": lever.label}
    report["loss"] = loss_falls(preset, data_root, run_dir, device, lever)
    log.info("loss over %d steps: %.4f -> %.4f (%s)", report["loss"]["steps"], report["loss"]["first_mean"],
             report["loss"]["last_mean"], "falls" if report["loss"]["passed"] else "DOES NOT FALL")
    stream = our_batches(bench_config(preset, data_root, run_dir, lever), device)
    batch = next(stream)
    stream.close()
    report["checkpointing"] = checkpoint_equivalence(preset, batch, device, lever)
    for policy in ("highres", "all"):
        entry = report["checkpointing"][policy]
        log.info("checkpointing %s vs none (%s): loss %.2e grads %.2e BN %.2e counts %s -> %s", policy,
                 report["checkpointing"]["precision"], entry["loss_rel_diff"], entry["grad_rel_l2"],
                 entry["bn_stats_max_rel"], entry["bn_counts_equal"], "ok" if entry["passed"] else "FAILED")
    report["passed"] = report["loss"]["passed"] and report["checkpointing"]["passed"]
    write_report(report, out, "smoke.json")
    return report
