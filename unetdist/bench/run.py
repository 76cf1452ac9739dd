"""`unetdist bench`: every section in one run, one JSON document and one table per machine.

Why this module exists: it is the order of work and nothing else. Data first (both trainers read
the same tiles), then the sections: the trainer comparison (ours / reference), each lever, DDP 1
vs 2 processes, memory headroom. The JSON is rewritten after every section, so a run stopped by
a time limit still leaves every finished section on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unetdist.config import UsageError
from unetdist.data.progress import Progress
from unetdist.bench.data import BenchData, bench_config, first_batch, prepare_data
from unetdist.model.peak import measured_matmul_flops, peak_flops_with_source
from unetdist.bench.presets import Preset, resolve_device, resolve_preset
from unetdist.bench.report import SCHEMA, SECTIONS, check_report, machine_info, write_report
from unetdist.model.flops import forward_flops_per_pixel

log = logging.getLogger(__name__)


def selected_sections(only: str | None, skip: str | None) -> list[str]:
    """Sections to run from ``--only a,b`` / ``--skip a,b`` (names in ``SECTIONS``)."""
    def parse(text: str | None) -> list[str]:
        names = [s.strip() for s in (text or "").split(",") if s.strip()]
        unknown = [s for s in names if s not in SECTIONS]
        if unknown:
            raise UsageError(f"unknown bench section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
        return names

    chosen = parse(only) or list(SECTIONS)
    dropped = set(parse(skip))
    return [s for s in chosen if s not in dropped]


def default_data_dir(preset: Preset) -> Path:
    """One dataset per tile geometry, reused across runs (like ``data/synth-default``)."""
    return Path("data") / f"bench-t{preset.tile}-i{preset.images}x{preset.image_size}"


def new_report(preset: Preset, device: torch.device, sections: list[str]) -> dict[str, Any]:
    fp32, source32 = peak_flops_with_source(device, torch.float32)
    bf16, source16 = peak_flops_with_source(device, torch.bfloat16)
    return {
        "schema": SCHEMA, "preset": preset.name, "machine": machine_info(device),
        "model": {"in_channels": 1, "num_classes": 2, "base_width": preset.base_width, "depth": 4,
                  "forward_flops_per_pixel": forward_flops_per_pixel(1, 2, preset.base_width, 4)},
        "settings": dataclasses.asdict(preset),
        "peak_flops": {"fp32": fp32, "bf16": bf16, "source": f"fp32 {source32}; bf16 {source16}"},
        "sections": sections, "rows": [], "comparisons": [], "ddp": None, "memory": None, "skipped": [],
        "loader": "see `unetdist bench loader` (data pipeline throughput)",
    }


@dataclass
class Context:
    """What every section needs: sizes, device, folders, the prepared data and one real batch."""

    args: argparse.Namespace
    preset: Preset
    device: torch.device
    out: Path
    data: BenchData
    run_dir: Path
    batch: dict[str, Any]
    deadline: float | None


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections and return the report (also written to ``OUT/bench.json``).

    ``args`` carries the command-line options of ``unetdist bench`` (see ``unetdist.bench.commands``).
    """
    device = resolve_device(args.device)
    preset = resolve_preset(args.preset, device, base_width=args.width, tile=args.tile, batch=args.batch_size,
                            steps=args.steps, workers=args.workers)
    sections = selected_sections(args.only, args.skip)
    if preset.threads:
        torch.set_num_threads(preset.threads)  # per-core figures on CPU (see Preset.threads)
    out = Path(args.out) if args.out else Path("runs") / "bench" / preset.name
    data_root = Path(args.data_dir) if args.data_dir else default_data_dir(preset)
    started = time.perf_counter()
    report = new_report(preset, device, sections)
    log.info("bench preset %s on %s: sections %s; output %s", preset.name, device, ", ".join(sections), out)
    write_report(report, out)

    data = prepare_data(preset, data_root, out / "run")
    report["settings"].update(reference_tiles=data.train_tiles, data_dir=str(data_root))
    ctx = Context(args, preset, device, out, data, out / "run",
                  first_batch(bench_config(preset, data_root, out / "run"), device),
                  started + args.deadline_s if args.deadline_s else None)
    # Order: what a time-limited run must not lose first; the many lever rows last (each skippable).
    todo = [s for s in ("reference", "memory", "ddp", "levers") if s in sections]
    with Progress(len(todo), "bench", "section", interval_s=0) as progress:  # a line per section done
        for section in todo:
            if section != "levers" and ctx.deadline is not None and time.perf_counter() > ctx.deadline:
                report["skipped"].append({"row": f"section {section}", "reason": "time budget (--deadline-s) spent"})
                progress.update(postfix=f"(skipped {section})")
                continue
            SECTION_RUNNERS[section](ctx, report)
            write_report(report, out)
            progress.update(postfix=f"({section} done)")

    _refresh_measured_peaks(report, device)
    report["elapsed_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["problems"] = check_report(report)
    for problem in report["problems"]:
        log.warning("report: %s", problem)
    write_report(report, out)
    return report


def _refresh_measured_peaks(report: dict[str, Any], device: torch.device) -> None:
    """Measured peaks (CPU, unknown GPUs): measure again at the end, keep the larger, redo MFU.

    A neighbour busy during the first measurement would otherwise inflate every MFU of the run.
    DDP rows keep their own processes' peaks (measured with their thread count).
    """
    if not report["peak_flops"]["source"].count("measured"):
        return
    measured_matmul_flops.cache_clear()
    peaks = {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        again = peak_flops_with_source(device, dtype)[0]
        report["peak_flops"][f"{key}_at_end"] = again
        peaks[key] = report["peak_flops"][key] = max(report["peak_flops"][key], again)
    for row in report["rows"]:
        if row["group"] != "ddp":
            row["hfu"] = row["tflops_per_s_per_device"] * 1e12 / peaks["fp32" if row["precision"] == "fp32" else "bf16"]
            row["mfu"] = row["hfu"] * row["model_flops_per_step"] / row["train_flops_per_step"]


def _section_reference(ctx: Context, report: dict[str, Any]) -> None:
    from unetdist.bench.compare import run_comparison
    from unetdist.bench.levers import best_lever, compile_available

    ours = best_lever(ctx.device, compile_available(ctx.device)[0])
    try:
        rows, ratios = run_comparison(ctx.preset, ctx.data, ctx.run_dir, ctx.device, ours)
    except torch.cuda.OutOfMemoryError as exc:
        report["skipped"].append({"row": "reference comparison", "reason": f"out of memory: {str(exc)[:200]}"})
        return
    report["rows"] += rows
    report["comparisons"] += ratios
    for comparison in ratios:
        log.info("%s: %.2fx", comparison["name"], comparison["ratio"])


def _section_memory(ctx: Context, report: dict[str, Any]) -> None:
    from unetdist.bench.levers import best_lever
    from unetdist.bench.memory import default_budget_gb, headroom_cuda, headroom_meta

    budget = ctx.args.memory_budget_gb or default_budget_gb(ctx.device, ctx.preset)
    if ctx.device.type == "cuda" and ctx.args.memory_method != "meta":
        report["memory"] = headroom_cuda(ctx.preset, ctx.data.root, ctx.run_dir, ctx.device, budget,
                                         best_lever(ctx.device, False))
    else:
        report["memory"] = headroom_meta(ctx.preset, budget)


def _section_ddp(ctx: Context, report: dict[str, Any]) -> None:
    from unetdist.bench.ddp import run_ddp

    rows, report["ddp"] = run_ddp(ctx.preset, ctx.data.root, ctx.run_dir, ctx.device, ctx.batch, report["skipped"])
    report["rows"] += rows


def _section_levers(ctx: Context, report: dict[str, Any]) -> None:
    from unetdist.bench.levers import run_levers

    def keep(row: dict[str, Any]) -> None:
        report["rows"].append(row)
        write_report(report, ctx.out)  # each row on disk as soon as it is measured

    run_levers(ctx.preset, ctx.data.root, ctx.run_dir, ctx.device, ctx.batch, report["skipped"], on_row=keep,
               deadline=ctx.deadline)


SECTION_RUNNERS: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    "reference": _section_reference, "memory": _section_memory, "ddp": _section_ddp, "levers": _section_levers,
}
