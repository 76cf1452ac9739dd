"""Data-parallel scaling: the same step on 1 and on 2 real processes (gloo on CPU, NCCL on GPUs).

Why this module exists: DDP's cost is the gradient all-reduce that backward does not hide. The
processes are real (``torch.multiprocessing`` spawn, torchrun's variables, joined through
``unetdist.parallel.env.init_distributed`` exactly as under torchrun), each with the same per-device
batch, so global throughput at 2 over twice that at 1 is the scaling efficiency. The 2-process
run also times a bare all-reduce of the gradient's size, the input to ``docs/scaling.md``'s model.

On CPU each process gets ``cores // 2`` threads in both runs, so "one device" is the same
share of the machine at 1 and 2 processes; on GPU each process drives its own GPU (2 needed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unetdist.bench.data import Lever, bench_config
from unetdist.bench.presets import Preset
from unetdist.bench.rows import make_row
from unetdist.bench.scaling import measured_efficiency_model
from unetdist.bench.timing import MemoryProbe, run_steps, sync
from unetdist.parallel.env import DistEnv

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _child(rank: int, world_size: int, port: int, threads: int, spec: dict[str, Any], batch: dict[str, Any],
           result_path: str) -> None:
    """One rank: join the group as under torchrun, time the step, rank 0 writes the result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    from unetdist.bench.data import build_our_trainer
    from unetdist.parallel.env import destroy_distributed, init_distributed

    env = init_distributed(timeout_s=600)
    try:
        preset = Preset(**spec["preset"])
        lever = Lever(**spec["lever"])
        extra = tuple(spec.get("extra", ()))
        cfg = bench_config(preset, Path(spec["data_root"]), Path(spec["run_dir"]), lever, extra)
        trainer = build_our_trainer(cfg, env, lever)
        probe = MemoryProbe(env.device, trainer.module)
        times = run_steps(lambda: trainer.train_step(batch), env.device, max(1, preset.warmup), preset.ddp_steps,
                          probe=probe)
        row = make_row(
            f"ours {lever.label} DDP x{world_size}{''.join(' ' + e.split('.', 1)[1] for e in extra)}", group="ddp", mode="compute", times=times, batch=preset.batch,
            tile=preset.tile, base_width=preset.base_width, precision=lever.precision,
            channels_last=lever.channels_last, checkpointing=lever.checkpointing, compile=lever.compile,
            device=env.device, memory_gb=probe.gb, memory_method=probe.method, world_size=world_size,
        )
        row["threads_per_process"] = threads
        numel = sum(p.numel() for p in trainer.module.parameters())
        result = {"row": row, "gradient_bytes": 4 * numel}
        if env.distributed:
            result["allreduce_s"] = _time_allreduce(env, numel)
        if env.is_main:
            Path(result_path).write_text(json.dumps(result))
    finally:
        destroy_distributed()


def _time_allreduce(env: DistEnv, numel: int, repeats: int = 5) -> float:
    """Median seconds of one all-reduce of ``numel`` fp32 values (the gradient, one bucket)."""
    from unetdist.parallel.collectives import all_reduce_sum_, barrier

    device = env.device
    flat = torch.ones(numel, device=device)
    for _ in range(2):
        all_reduce_sum_(env, flat)
    seconds = []
    for _ in range(repeats):
        barrier(env)
        sync(device)
        start = time.perf_counter()
        all_reduce_sum_(env, flat)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_world(world_size: int, threads: int, spec: dict[str, Any], batch: dict[str, Any],
              attempts: int = 2) -> dict[str, Any]:
    """Spawn ``world_size`` processes and return rank 0's result.

    A second attempt on a new port covers the one race a free-port pick cannot exclude: another
    job binding the port between our pick and the group's rendezvous.
    """
    import torch.multiprocessing as mp

    for attempt in range(attempts):
        with tempfile.TemporaryDirectory(prefix="unetdist-ddp-") as tmp:
            result_path = str(Path(tmp) / "result.json")
            try:
                mp.start_processes(_child, args=(world_size, _free_port(), threads, spec, batch, result_path),
                                   nprocs=world_size, join=True, start_method="spawn")
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
                if attempt + 1 == attempts:
                    raise
                log.warning("DDP x%d failed (%s); trying again on another port", world_size, str(exc)[-300:])
                continue
            return json.loads(Path(result_path).read_text())
    raise AssertionError("unreachable")


# Each DDP option against the default (bucket 25 MB, gradients as bucket views, no static graph, fp32 all-reduce).
DDP_OPTIONS: tuple[tuple[str, ...], ...] = (
    ("parallel.gradient_as_bucket_view=false",), ("parallel.static_graph=true",), ("parallel.bucket_mb=1",),
    ("parallel.grad_compression=bf16",),
)


def run_ddp(preset: Preset, data_root: Path, run_dir: Path, device: torch.device, batch: dict[str, Any],
            skipped: list[dict[str, str]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rows for 1 and 2 processes (fp32, the lever every device runs) and the scaling summary."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        skipped.append({"row": "DDP x2", "reason": f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"})
        return [], None
    threads = max(1, cpu_cores() // 2) if device.type == "cpu" else max(1, torch.get_num_threads())
    lever = Lever()
    spec = {"preset": dataclasses.asdict(preset), "lever": dataclasses.asdict(lever), "data_root": str(data_root),
            "run_dir": str(run_dir)}
    cpu_batch = {k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    results = {}
    for world_size in (1, 2):
        log.info("DDP: %d process(es) x %d thread(s)", world_size, threads)
        results[world_size] = run_world(world_size, threads, spec, cpu_batch)
    rows = [results[1]["row"], results[2]["row"]]
    one, two = rows
    for extra in DDP_OPTIONS if preset.ddp_options else ():
        log.info("DDP: 2 processes with %s", " ".join(extra))
        rows.append(run_world(2, threads, {**spec, "extra": list(extra)}, cpu_batch)["row"])
    gradient_bytes = results[2]["gradient_bytes"]
    allreduce_s = results[2]["allreduce_s"]
    summary = {
        "processes": [1, 2],
        "threads_per_process": threads,
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "scaling_efficiency": two["images_per_s"] / (2 * one["images_per_s"]),
        "gradient_mb": gradient_bytes / 1e6,
        "allreduce_s": allreduce_s,
        # ring all-reduce moves 2 (n-1)/n of the buffer through each link
        "allreduce_bus_gb_per_s": 2 * (2 - 1) / 2 * gradient_bytes / allreduce_s / 1e9,
        "allreduce_fraction_of_step": allreduce_s / two["step_s"],
        # docs/scaling.md's model fed with this run's 1-process step and all-reduce time
        "modelled_efficiency": measured_efficiency_model(one["step_s"], allreduce_s, gradient_bytes, tile=preset.tile,
                                                         batch=preset.batch, base_width=preset.base_width),
    }
    return rows, summary
