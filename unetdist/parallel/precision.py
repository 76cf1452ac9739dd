"""Which autocast dtype a precision setting means on this device.

Why this module exists: both training engines, the DeepSpeed config and prediction must make the
same choice, and the choice depends on the device, which the parallel layer owns. The choice
itself is a pure function of the device's kind and compute capability, so it is tested on CPU
with the capabilities of GPUs we do not have.

bf16 counts only where the hardware computes it (compute capability 8.0 and up: A100, H100, L4,
...). `torch.cuda.is_bf16_supported()` also says yes on V100 and T4, where bf16 is emulated and
far slower than fp16; there `auto` trains in fp16 with loss scaling and predicts in fp32.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, or None for any other device."""
    if device.type != "cuda":
        return None
    if torch.version.hip:  # every ROCm GPU PyTorch supports computes bf16
        return (9, 0)
    return torch.cuda.get_device_capability(device)


def native_bf16(capability: tuple[int, int] | None) -> bool:
    """True when a GPU of this compute capability has bf16 hardware (Ampere, 8.0, and later)."""
    return capability is not None and capability[0] >= 8


def choose_amp_dtype(precision: str, device_type: str, capability: tuple[int, int] | None) -> torch.dtype | None:
    """The training autocast dtype for `train.precision` (None: fp32), from values only.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device_type: ``cuda``, ``cpu``, ...
        capability: the CUDA compute capability (None off CUDA).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device_type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(capability) else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def choose_inference_dtype(precision: str, device_type: str, capability: tuple[int, int] | None) -> torch.dtype | None:
    """The prediction autocast dtype for ``auto`` / ``fp32`` / ``bf16`` (None: fp32).

    ``auto`` is bf16 only on GPUs that compute it natively: emulated bf16 is slower than fp32,
    and fp16 without loss scaling could overflow on activations a model trained in fp32 produces.
    """
    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" and native_bf16(capability) else None
    if precision == "fp16":
        raise ValueError("prediction offers auto, fp32 or bf16 (fp16 could overflow without loss scaling)")
    return choose_amp_dtype(precision, device_type, capability)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for `train.precision` on this device (None: fp32)."""
    return choose_amp_dtype(precision, device.type, cuda_capability(device))


def resolve_inference_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The prediction autocast dtype on this device (None: fp32)."""
    return choose_inference_dtype(precision, device.type, cuda_capability(device))
