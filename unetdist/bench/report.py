"""The benchmark's JSON document, its schema check, and the table a person reads.

Why this module exists: the JSON is what machines compare across runs (and what the CI smoke
test checks: the schema and that every figure is positive); the table is what a person reads
at the end of a run. Both are built from the same dict.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
from pathlib import Path
from typing import Any

import torch

from unetdist.bench.rows import FIGURES

SCHEMA = "unetdist.bench/1"
SECTIONS: tuple[str, ...] = ("reference", "levers", "ddp", "memory")


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: device, torch build, CPU threads, load when it started."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cpu_model": _cpu_model(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gb=props.total_memory / 2**30,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = info["cpu_model"]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(report: dict[str, Any], out_dir: Path, name: str = "bench.json") -> Path:
    """Write atomically (a partial run leaves the last complete document)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report: missing keys, or a figure that is not a positive finite number."""
    problems = []
    for key in ("schema", "preset", "machine", "model", "settings", "peak_flops", "rows", "comparisons",
                "skipped", "sections"):
        if key not in report:
            problems.append(f"missing key {key!r}")
    if problems:
        return problems
    if report["schema"] != SCHEMA:
        problems.append(f"schema {report['schema']!r} != {SCHEMA!r}")
    for row in report["rows"]:
        for figure in FIGURES:
            if not _positive(row.get(figure)):
                problems.append(f"row {row.get('name')!r}: {figure}={row.get(figure)!r} is not positive")
    for comparison in report["comparisons"]:
        for key in ("ratio", "ratio_best"):
            if key in comparison and not _positive(comparison[key]) or key == "ratio" and key not in comparison:
                problems.append(f"comparison {comparison.get('name')!r}: {key} {comparison.get(key)!r}")
    for key, value in report["peak_flops"].items():
        if key != "source" and not _positive(value):  # fp32, bf16 (and *_at_end when measured)
            problems.append(f"peak_flops.{key}={value!r} is not positive")
    ddp = report.get("ddp")
    if ddp:
        for key in ("scaling_efficiency", "gradient_mb", "allreduce_s", "allreduce_bus_gb_per_s",
                    "modelled_efficiency"):
            if not _positive(ddp.get(key)):
                problems.append(f"ddp.{key}={ddp.get(key)!r} is not positive")
    memory = report.get("memory")
    if memory:
        for policy, figures in memory["policies"].items():
            for key in ("max_batch", "per_sample_gb", "fixed_gb"):
                if not _positive(figures.get(key)):
                    problems.append(f"memory.{policy}.{key}={figures.get(key)!r} is not positive")
    return problems


def format_table(report: dict[str, Any]) -> str:
    """The rows, ratios, DDP summary and memory headroom as plain text."""
    lines = [f"unetdist bench --preset {report['preset']} on {report['machine'].get('device_name')} "
             f"({report['machine']['device']}, torch {report['machine']['torch']}); "
             f"model width {report['model']['base_width']}, tile {report['settings']['tile']}, "
             f"batch {report['settings']['batch']} per device"]
    header = f"{'row':<52} {'step s':>8} {'img/s/dev':>10} {'MP/s/dev':>9} {'TFLOP/s':>8} {'MFU':>7} {'HFU':>7} {'mem GB':>7}"
    lines += ["", header, "-" * len(header)]
    order = {"reference": 0, "levers": 1, "ddp": 2}
    for row in sorted(report["rows"], key=lambda r: order.get(r["group"], 3)):
        lines.append(f"{row['name']:<52} {row['step_s']:>8.4f} {row['images_per_s_per_device']:>10.2f} "
                     f"{row['megapixels_per_s_per_device']:>9.3f} {row['tflops_per_s_per_device']:>8.4f} "
                     f"{row['mfu']:>7.2%} {row.get('hfu', row['mfu']):>7.2%} {row['peak_memory_gb']:>7.3f}")
    if report["comparisons"]:
        lines += ["", "ratios:"]
        lines += [f"  {c['name']}: {c['ratio']:.2f}x (fastest steps: {c.get('ratio_best', float('nan')):.2f}x)"
                  for c in report["comparisons"]]
    ddp = report.get("ddp")
    if ddp:
        lines += ["", f"DDP ({ddp['backend']}, {ddp['threads_per_process']} thread(s)/process on CPU): scaling "
                      f"efficiency 1 -> 2 processes {ddp['scaling_efficiency']:.2f}; all-reduce of "
                      f"{ddp['gradient_mb']:.1f} MB: {ddp['allreduce_s'] * 1e3:.1f} ms "
                      f"({ddp['allreduce_bus_gb_per_s']:.2f} GB/s bus), "
                      f"{ddp['allreduce_fraction_of_step']:.1%} of a step; the overlap model "
                      f"(docs/scaling.md) predicts {ddp['modelled_efficiency']:.2f}"]
    memory = report.get("memory")
    if memory:
        lines += ["", f"memory headroom: {memory['tile']}x{memory['tile']} tiles, width {memory['base_width']}, "
                      f"{memory['precision']}, budget {memory['budget_gb']:.1f} GB ({memory['method']})"]
        for policy, figures in memory["policies"].items():
            ratio = "" if policy == "none" else f"  ({memory.get(f'ratio_{policy}_vs_none', 0):.2f}x none)"
            lines.append(f"  ckpt={policy:<8} max batch {figures['max_batch']:>5}  "
                         f"{figures.get('per_sample_gb', 0):.3f} GB/sample{ratio}")
    for skip in report["skipped"]:
        lines.append(f"skipped {skip['row']}: {skip['reason']}")
    return "\n".join(lines)
