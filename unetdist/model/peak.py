"""The peak FLOP/s of a device, the denominator of model-FLOP utilisation (MFU).

Why this module exists: MFU is only comparable between runs when everyone divides by the same
peak. For known GPUs that is the vendor's dense (no 2:4 sparsity) tensor-core figure for the
precision the convolutions run in; for a CPU or an unknown GPU there is no agreed datasheet
figure, so the peak is a measured large matmul in this process (with its thread count), cached
per process. The training loop and ``unetdist bench`` both call :func:`peak_flops`.

Precision that the convolutions run in: bf16/fp16 autocast -> the 16-bit tensor-core peak;
fp32 -> the TF32 peak when cuDNN may use TF32 (PyTorch's default,
``torch.backends.cudnn.allow_tf32``), the plain fp32 peak otherwise.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)


class DevicePeak(NamedTuple):
    """Dense peaks in FLOP/s: 16-bit tensor cores, TF32 tensor cores, plain fp32 (CUDA cores)."""

    bf16: float
    tf32: float
    fp32: float


T = 1e12
# Datasheet dense peaks per GPU (sparsity figures halved). Matched by substring of the lower-cased
# torch.cuda.get_device_name(), first match wins, so more specific names come first.
# None: a name we recognise but whose figure we do not trust (measured instead).
GPU_PEAKS: tuple[tuple[str, DevicePeak | None], ...] = (
    ("gh200", DevicePeak(989.4 * T, 494.7 * T, 66.9 * T)),
    ("h200 nvl", DevicePeak(835.5 * T, 417.8 * T, 60.0 * T)),
    ("h200", DevicePeak(989.4 * T, 494.7 * T, 66.9 * T)),
    ("h100 nvl", DevicePeak(835.5 * T, 417.8 * T, 60.0 * T)),
    ("h100 pcie", DevicePeak(756.5 * T, 378.0 * T, 51.2 * T)),
    ("h100", DevicePeak(989.4 * T, 494.7 * T, 66.9 * T)),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("gb200", DevicePeak(2500.0 * T, 1250.0 * T, 80.0 * T)),  # GB200 NVL72, per GPU
    ("b200", DevicePeak(2250.0 * T, 1125.0 * T, 75.0 * T)),  # HGX B200, per GPU
    ("a100", DevicePeak(312.0 * T, 156.0 * T, 19.5 * T)),
    ("a10g", None),
    ("a10", DevicePeak(125.0 * T, 62.5 * T, 31.2 * T)),
    ("l40s", DevicePeak(362.1 * T, 183.0 * T, 91.6 * T)),
    ("l40", DevicePeak(181.0 * T, 90.5 * T, 90.5 * T)),
    ("l4", DevicePeak(121.0 * T, 60.0 * T, 30.3 * T)),
    ("rtx 4090", DevicePeak(165.2 * T, 82.6 * T, 82.6 * T)),
    ("v100", DevicePeak(125.0 * T, 15.7 * T, 15.7 * T)),  # fp16 tensor cores; no bf16/TF32 hardware
)


def lookup_gpu_peak(name: str) -> tuple[str, DevicePeak] | None:
    """The table entry for a GPU name (``torch.cuda.get_device_name()``), or None when unknown.

    An entry matches as a whole model name: "b200" does not match "GB200", nor "a10" "A100".
    """
    lowered = name.lower()
    for key, peak in GPU_PEAKS:
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![0-9])", lowered):
            return (key, peak) if peak is not None else None
    return None


def precision_key(dtype: torch.dtype, device_type: str, cudnn_tf32: bool) -> str:
    """Which peak a run in ``dtype`` is measured against: ``bf16`` (16-bit), ``tf32`` or ``fp32``.

    TF32 exists only on CUDA GPUs, and only counts while cuDNN may use it for the convolutions.
    """
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "tf32" if device_type == "cuda" and cudnn_tf32 else "fp32"
    raise ValueError(f"no peak for dtype {dtype}; use float32, bfloat16 or float16")


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of ``device`` for convolutions computed in ``dtype`` (the autocast dtype, or fp32).

    Known GPUs: the datasheet's dense figure (see ``GPU_PEAKS``). CPUs and unknown GPUs: a
    measured square matmul in ``dtype`` with this process's thread count, measured once per
    process (about a third of a second) and cached; on CPU a 16-bit peak is at least the fp32 one.

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N`` (a ``torch.device`` or its string).
        dtype: ``torch.float32`` (fp32 runs; TF32 peak on GPU while cuDNN may use TF32),
            ``torch.bfloat16`` or ``torch.float16`` (autocast runs).

    Returns:
        FLOP/s (a positive float).
    """
    return peak_flops_with_source(device, dtype)[0]


def peak_flops_with_source(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """:func:`peak_flops` and where it came from (``table:<entry>/<precision>`` or ``measured:...``)."""
    device = torch.device(device)
    key = precision_key(dtype, device.type, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        found = lookup_gpu_peak(torch.cuda.get_device_name(index))
        if found is not None:
            name, peak = found
            return float(getattr(peak, key)), f"table:{name}/{key}"
    threads = torch.get_num_threads()
    tf32 = key == "tf32"  # convolutions may use TF32: so must the matmul that stands for the peak
    flops = measured_matmul_flops(str(device), dtype, threads, tf32=tf32)
    source = f"measured:matmul/{'tf32' if tf32 else str(dtype).removeprefix('torch.')}/{threads}threads"
    if dtype != torch.float32 and device.type == "cpu":
        # Many CPUs emulate 16-bit matmuls slower than their fp32 ones while oneDNN's 16-bit
        # convolutions are not: the machine's peak for an autocast run is at least its fp32 peak.
        fp32 = measured_matmul_flops(str(device), torch.float32, threads)
        if fp32 > flops:
            flops, source = fp32, f"measured:matmul/float32/{threads}threads (above the 16-bit matmul)"
    return flops, source


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device: str, dtype: torch.dtype, threads: int, seconds: float = 0.3,
                          tf32: bool = False) -> float:
    """Best-of-3 FLOP/s of repeated ``a @ b`` on square matrices (cached per device, dtype, threads, TF32).

    ``tf32``: let a float32 matmul use TF32 tensor cores during the measurement (PyTorch's matmul
    default is off, cuDNN's convolution default on); no effect off CUDA.

    Sizes: 1024 on CPU, 8192 on GPUs. ``threads`` is part of the cache key only: the
    measurement uses the current thread count. On a shared machine a busy neighbour lowers the
    figure; ``unetdist bench`` measures again at its end and keeps the larger one.
    """
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 1024
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dev, dtype)
    b = torch.randn(n, n, generator=gen).to(dev, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        (a @ b).sum()  # warm-up: allocation, kernel selection
        sync()
        best = 0.0
        for _ in range(3):
            count, start = 0, time.perf_counter()
            while True:
                a @ b
                count += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / 3:
                    break
            best = max(best, 2.0 * n**3 * count / elapsed)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    log.info("measured %s %s matmul peak: %.1f GFLOP/s (%d threads)", device, dtype, best / 1e9, threads)
    return best
