"""Turn a plain UNet into the module that trains: one function, a fixed order.

Order matters: norm conversion and checkpointing change which modules run, memory format is
set once the module sits on its device, and DDP wraps last so it registers the final
parameters and buffers (and its hooks see checkpointed recomputation, not a second forward).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unetdist.config import ParallelConfig, TrainConfig
from unetdist.dist.checkpointing import apply_activation_checkpointing
from unetdist.dist.env import DistEnv

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, train: TrainConfig, parallel: ParallelConfig, env: DistEnv) -> nn.Module:
    """SyncBatchNorm (GPU, several ranks) -> activation checkpointing -> device/memory format -> DDP."""
    if parallel.sync_batchnorm and env.distributed and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    apply_activation_checkpointing(model, train.activation_checkpointing)
    model.to(env.device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
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
