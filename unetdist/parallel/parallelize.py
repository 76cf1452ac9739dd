"""Turn a plain UNet into the module that trains: one place, a fixed order.

`prepare_module` does what every backend needs (norm conversion, activation checkpointing,
device, memory format); `wrap_ddp` adds DDP last so it registers the final parameters and
buffers. The DeepSpeed adapter calls `prepare_module` and hands the result to its engine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unetdist.config import ParallelConfig, TrainConfig
from unetdist.parallel.checkpointing import apply_activation_checkpointing
from unetdist.parallel.env import DistEnv


def prepare_module(model: nn.Module, train: TrainConfig, parallel: ParallelConfig, env: DistEnv) -> nn.Module:
    """SyncBatchNorm (GPU, several ranks) -> activation checkpointing -> device -> memory format."""
    if parallel.sync_batchnorm and env.distributed and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    apply_activation_checkpointing(model, train.activation_checkpointing)
    model.to(env.device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(model: nn.Module, parallel: ParallelConfig, env: DistEnv) -> nn.Module:
    """DDP across ranks (the plain module when running alone)."""
    if not env.distributed:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        bucket_cap_mb=parallel.bucket_mb,
        static_graph=parallel.static_graph,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper, whose state_dict keys carry no `module.` prefix."""
    return model.module if isinstance(model, DistributedDataParallel) else model
