"""`unetdist bench shard`: does `unetdist shard` tile a whole-slide image in bounded memory, and how fast?

Writes synthetic tiled uint16 OME-TIFFs (5,000 x 5,000 and 20,000 x 20,000 by default, 50 MB and
800 MB raw; written tile by tile, never whole in memory) with instance-free class labels, then runs
the real `unetdist shard` command on each in a fresh process and samples the resident memory of
that process and its workers while it runs (summed over the process tree as proportional set size
from /proc, so pages a forked worker shares with its parent count once). Reported per size: that
peak, the largest single process's peak RSS, wall time, megapixels/s, tiles written.

Goals (from the issue on whole-slide inputs): peak RSS under 1.5 GB, and growing by less than 25%
from the 5k image to the 20k one (memory bounded by the band being tiled, not by the image).
Each big image is the training split; a small 512 x 512 image is the validation split (a dataset
needs both), so the figures are the big image's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = "unetdist.bench.shard/1"
GOAL_RSS_GB = 1.5
GOAL_GROWTH = 0.25
CHUNK = 512  # tile size of the synthetic TIFFs


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `unetdist bench shard`."""
    parser.add_argument("--sizes", default="5000,20000", help="comma-separated image heights = widths in pixels")
    parser.add_argument("--tile", type=int, default=256, help="shard tile size")
    parser.add_argument("--workers", type=int, default=1,
                        help="`shard --workers` (the same for every size, so that memory is compared like for like)")
    parser.add_argument("--region-pixels", type=int, default=None, help="`shard --region-pixels` (default: config)")
    parser.add_argument("--out", default="runs/bench/shard", help="folder for bench-shard.json")
    parser.add_argument("--data-dir", help="where the synthetic OME-TIFFs and shards go (default: a temp folder, "
                                           "removed afterwards)")


def synthetic_tiles(size: int, seed: int, labels: bool) -> Iterator[np.ndarray]:
    """512 x 512 tiles of a synthetic fluorescence image (or its class labels), row by row.

    Each tile is generated on its own (seeded by its position): noise around a camera offset plus
    a few bright disks entirely inside the tile, and about a third of the tiles empty.
    """
    yy, xx = np.mgrid[:CHUNK, :CHUNK]
    for ty in range(0, size, CHUNK):
        for tx in range(0, size, CHUNK):
            rng = np.random.default_rng([seed, ty, tx])
            mask = np.zeros((CHUNK, CHUNK), bool)
            for _ in range(int(rng.integers(0, 9)) if rng.random() > 0.33 else 0):
                r = int(rng.integers(8, 24))
                cy, cx = rng.integers(r, CHUNK - r, 2)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if labels:
                yield mask.astype(np.uint8)
            else:
                noise = rng.normal(500.0, 40.0, (CHUNK, CHUNK)) + 2500.0 * mask
                yield np.clip(noise, 0, 65535).astype(np.uint16)


def write_slide(path: Path, size: int, seed: int, labels: bool) -> None:
    """A tiled (BigTIFF) OME-TIFF of size x size written from a tile generator, never whole in memory."""
    import tifffile

    dtype = np.uint8 if labels else np.uint16
    tifffile.imwrite(path, synthetic_tiles(size, seed, labels), shape=(size, size), dtype=dtype,
                     tile=(CHUNK, CHUNK), bigtiff=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325})


def _tree_memory(pid: int) -> tuple[int, int]:
    """(bytes held by a process and all its descendants, largest single process's RSS), from Linux /proc.

    The proportional set size (PSS) of each process is summed: forked workers share the parent's
    pages, which plain RSS would count once per process. Falls back to RSS where PSS is missing.
    """
    total, largest, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += _proc_kb(current, "smaps_rollup", "Pss:") or _proc_kb(current, "status", "VmRSS:")
            largest = max(largest, _proc_kb(current, "status", "VmRSS:"))
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, ValueError):
            continue
        todo += [int(c) for c in children]
    return total * 1024, largest * 1024


def _proc_kb(pid: int, name: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_shard(list_file: Path, out: Path, tile: int, workers: int, region_pixels: int | None) -> dict[str, Any]:
    """`unetdist shard` in a fresh process, its tree's memory sampled every 50 ms."""
    command = [sys.executable, "-c", "import sys; from unetdist.cli import main; sys.exit(main())", "shard",
               "--list", str(list_file), "--out", str(out), "--tile", str(tile), "--workers", str(workers)]
    if region_pixels:
        command += ["--region-pixels", str(region_pixels)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = largest = 0
    while child.poll() is None:
        tree, single = _tree_memory(child.pid)
        peak, largest = max(peak, tree), max(largest, single)
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    stdout, stderr = child.communicate()
    if child.returncode:
        raise RuntimeError(f"unetdist shard failed ({child.returncode}): {stderr.strip()[-2000:]}")
    return {"seconds": seconds, "peak_tree_bytes": peak, "peak_rss_largest_process_bytes": largest,
            "output": stdout.strip()}


def startup_seconds() -> float:
    """Wall time of a fresh interpreter importing the shard code: part of every run, not of the pixels."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import unetdist.cli, unetdist.data.shards"], check=True)
    return time.perf_counter() - start


def bench_size(folder: Path, size: int, args: argparse.Namespace, startup: float) -> dict[str, Any]:
    """Write the size x size slide, shard it, report the figures; shards are removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    image, label = folder / f"slide_{size}.ome.tif", folder / f"slide_{size}_labels.ome.tif"
    start = time.perf_counter()
    if not image.exists():
        write_slide(image, size, seed=1, labels=False)
        write_slide(label, size, seed=1, labels=True)
    written = time.perf_counter() - start
    val, val_label = folder / "val.ome.tif", folder / "val_labels.ome.tif"
    if not val.exists():
        write_slide(val, CHUNK, seed=2, labels=False)
        write_slide(val_label, CHUNK, seed=2, labels=True)
    pairs = folder / f"pairs_{size}.csv"
    pairs.write_text(f"image,label,split\n{image.name},{label.name},train\n{val.name},{val_label.name},val\n")
    out = folder / f"shards_{size}"
    shutil.rmtree(out, ignore_errors=True)
    result = run_shard(pairs, out, args.tile, args.workers, args.region_pixels)
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    megapixels = size * size / 1e6
    row = {"size": size, "megapixels": megapixels, "raw_mb": size * size * 2 / 1e6,
           "write_tiff_s": written, "shard_s": result["seconds"], "megapixels_per_s": megapixels / result["seconds"],
           "megapixels_per_s_after_startup": megapixels / max(result["seconds"] - startup, 1e-3),
           "peak_memory_gb": result["peak_tree_bytes"] / 1e9,
           "peak_rss_largest_process_gb": result["peak_rss_largest_process_bytes"] / 1e9,
           "train_tiles": manifest["train"]["samples"], "load_average": list(os.getloadavg())}
    log.info("shard %d x %d: %.1f s, %.2f MP/s, peak memory %.2f GB", size, size, row["shard_s"],
             row["megapixels_per_s"], row["peak_memory_gb"])
    return row


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'size':>7} {'MP':>7} {'shard s':>8} {'MP/s':>7} {'MP/s-start':>10} {'peak mem GB':>12} "
             f"{'largest proc GB':>16} {'tiles':>7} {'load':>6}"]
    for r in report["rows"]:
        lines.append(f"{r['size']:>7} {r['megapixels']:>7.0f} {r['shard_s']:>8.1f} {r['megapixels_per_s']:>7.2f} "
                     f"{r['megapixels_per_s_after_startup']:>10.2f} {r['peak_memory_gb']:>12.3f} "
                     f"{r['peak_rss_largest_process_gb']:>16.3f} {r['train_tiles']:>7} {r['load_average'][0]:>6.1f}")
    goals = report["goals"]
    lines.append(f"start-up (interpreter + imports): {report['startup_s']:.1f} s, in every run")
    under, grows = ("yes" if goals[k] else "NO" for k in ("rss_under_goal", "growth_under_goal"))
    lines.append(f"peak memory < {GOAL_RSS_GB} GB: {under}; growth smallest -> largest {goals['rss_growth']:+.1%} "
                 f"(< {GOAL_GROWTH:.0%}: {grows})")
    return "\n".join(lines)


def run_shard_bench(args: argparse.Namespace) -> int:
    """Run every size, write bench-shard.json and print the table; exit 1 when a goal is missed."""
    from unetdist.bench.report import machine_info, write_report

    import torch

    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    temp = None if args.data_dir else tempfile.mkdtemp(prefix="unetdist-bench-shard-")
    folder = Path(args.data_dir or temp)
    try:
        startup = startup_seconds()
        rows = [bench_size(folder, size, args, startup) for size in sizes]
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    peaks = [r["peak_memory_gb"] for r in rows]
    growth = peaks[-1] / peaks[0] - 1 if len(peaks) > 1 else 0.0
    report = {"schema": SCHEMA, "machine": machine_info(torch.device("cpu")), "startup_s": startup,
              "settings": {"tile": args.tile, "workers": args.workers, "region_pixels": args.region_pixels,
                           "sizes": sizes, "input": "tiled uint16 OME-TIFF (512 x 512 tiles, BigTIFF) + uint8 labels"},
              "rows": rows,
              "goals": {"rss_goal_gb": GOAL_RSS_GB, "rss_under_goal": max(peaks) < GOAL_RSS_GB, "rss_growth": growth,
                        "growth_under_goal": growth < GOAL_GROWTH}}
    path = write_report(report, Path(args.out), "bench-shard.json")
    print(format_table(report))
    print(f"\nwrote {path}")
    return 0 if report["goals"]["rss_under_goal"] and report["goals"]["growth_under_goal"] else 1
