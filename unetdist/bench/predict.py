"""`unetdist bench predict`: peak memory and speed of whole-slide prediction, 1 and N ranks.

Why this module exists: prediction must run in memory bounded by the windows in flight, not by
the image, and that is a claim about a real run. Each case predicts a synthetic tiled uint16
OME-TIFF (written tile by tile by tifffile, made once and kept in `--data-dir`) with a small model,
in a fresh process (`python -m unetdist.infer predict`, under torchrun for several ranks), started
by a small wrapper process whose `RUSAGE_CHILDREN` peak is the largest RSS of any one process of
that run (the agent or a rank). Writes `bench_predict.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# The wrapper: run the command, print the largest RSS (KiB on Linux) of any process it waited for.
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")
RSS_LIMIT_MB = 1536.0
GROWTH_LIMIT = 0.25
TILE = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="square image sides in pixels "
                                                                                 "(default 5000 20000)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--width", type=int, default=4, help="model base width (default 4)")
    p.add_argument("--depth", type=int, default=2, help="model depth (default 2)")
    p.add_argument("--tile", type=int, default=256, help="prediction window (default 256)")
    p.add_argument("--format", choices=("auto", "zarr", "tiff"), default="auto", help="output format (default auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--data-dir", default="data/bench-predict", help="synthetic images, made once and reused "
                                                                     "(default data/bench-predict)")
    p.add_argument("--out", default="runs/bench/predict", help="output folder (default runs/bench/predict)")


def synthetic_slide(path: Path, side: int, seed: int = 0) -> Path:
    """A side x side uint16 tiled OME-TIFF of blob-like nuclei on a background, written tile by tile."""
    if path.exists():
        return path
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tifffile.imwrite(tmp, _tiles(side, seed), shape=(side, side), dtype=np.uint16, tile=(TILE, TILE), ome=True,
                     bigtiff=side * side * 2 >= 2**31 - 2**25, photometric="minisblack",
                     metadata={"axes": "YX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325})
    os.replace(tmp, path)
    return path


def _tiles(side: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    for y in range(0, side, TILE):
        for x in range(0, side, TILE):
            blobs = np.sin((yy + y) / 9.0) * np.sin((xx + x) / 11.0)
            tile = 400 + 2500 * (blobs > 0.5) + rng.normal(0, 60, (TILE, TILE))
            yield tile[: min(TILE, side - y), : min(TILE, side - x)].clip(0, 65535).astype(np.uint16)


def _model(path: Path, width: int, depth: int) -> Path:
    import torch

    from unetdist.infer.model_file import model_file_state
    from unetdist.model import UNet

    torch.manual_seed(0)
    stats = {"low": [300.0], "high": [3100.0], "clipped_mean": [1200.0], "clipped_std": [1100.0]}
    torch.save(model_file_state(UNet(in_channels=1, num_classes=2, base_width=width, depth=depth), stats), path)
    return path


def run_case(model: Path, image: Path, out: Path, ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    """One prediction in a fresh process tree: seconds, megapixels/s and the largest RSS of one process."""
    predict = ["-m", "unetdist.infer", "predict", str(model), str(image), "--out", str(out), "--overwrite",
               "--tile", str(args.tile), "--overlap", "32", "--format", args.format]
    if ranks == 1:
        cmd = [sys.executable, *predict]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *predict]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"prediction failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")))
    summary = json.loads((out / "predict.json").read_text())
    return {"ranks": ranks, "seconds_total": seconds, "seconds_predict": summary["seconds"],
            "megapixels": summary["megapixels"], "megapixels_per_s": summary["megapixels"] / summary["seconds"],
            "peak_rss_mb": peak_kb / 1024.0, "format": summary["files"][0]["format"]}


def run_predict_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every size x rank count; the verdicts on peak RSS and its growth from the smallest to the largest size."""
    data, out = Path(args.data_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _model(out / "model.pt", args.width, args.depth)
    rows = []
    for side in sorted(args.sizes):
        image = synthetic_slide(data / f"slide_{side}.ome.tif", side)
        for ranks in args.ranks:
            row = {"side": side, **run_case(model, image, out / f"pred_{side}_{ranks}", ranks, args)}
            rows.append(row)
            print(format_row(row), flush=True)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
              "model": {"width": args.width, "depth": args.depth, "tile": args.tile, "threads": args.threads},
              "rows": rows, "checks": _checks(rows)}
    (out / "bench_predict.json").write_text(json.dumps(report, indent=1))
    return report


def _checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checks: dict[str, Any] = {"rss_limit_mb": RSS_LIMIT_MB, "growth_limit": GROWTH_LIMIT,
                              "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}
    checks["rss_ok"] = checks["max_peak_rss_mb"] < RSS_LIMIT_MB
    for ranks in sorted({r["ranks"] for r in rows}):
        mine = sorted((r for r in rows if r["ranks"] == ranks), key=lambda r: r["side"])
        if len(mine) > 1:
            growth = mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"] - 1.0
            checks[f"growth_{ranks}_ranks"] = growth
            checks[f"growth_{ranks}_ranks_ok"] = growth < GROWTH_LIMIT
    return checks


def format_row(row: dict[str, Any]) -> str:
    return (f"{row['side']:>6} x {row['side']:<6} {row['ranks']:>2} rank(s)  {row['format']:<4}  "
            f"{row['megapixels_per_s']:8.3f} MP/s  {row['seconds_total']:8.1f} s  "
            f"peak RSS {row['peak_rss_mb']:7.1f} MB")


def format_table(report: dict[str, Any]) -> str:
    lines = ["  image            ranks   fmt   speed          wall time   peak RSS (largest process)"]
    lines += [format_row(r) for r in report["rows"]]
    c = report["checks"]
    verdict = "ok" if c["rss_ok"] else "OVER"
    lines.append(f"peak RSS {c['max_peak_rss_mb']:.0f} MB (limit {RSS_LIMIT_MB:.0f}): {verdict}")
    for key, value in c.items():
        if key.startswith("growth_") and key.endswith("_ranks"):
            lines.append(f"RSS growth smallest -> largest, {key.split('_')[1]} rank(s): {100 * value:.1f}% "
                         f"(limit {100 * GROWTH_LIMIT:.0f}%): {'ok' if c[key + '_ok'] else 'OVER'}")
    lines.append(f"load average {report['machine']['load_avg'][0]:.2f} on {report['machine']['cpus']} CPUs")
    return "\n".join(lines)
