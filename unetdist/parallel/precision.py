"""Which autocast dtype a precision setting means on this device.

Why this module exists: both training engines and prediction must make the same choice, and the
choice depends on the device, which the parallel layer owns.
"""

from __future__ import annotations

import torch

from unetdist.config import ConfigError


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on this device (None: fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16
