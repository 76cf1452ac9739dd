"""Optimizer and learning-rate schedule built from the config."""

from __future__ import annotations

import math

import torch

from unetdist.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW by default; SGD with the U-Net paper's momentum 0.99 on request.

    ``fused``: one kernel for the whole update (CPU and CUDA) instead of torch's default on CPU,
    a loop of ~10 small ops per parameter tensor; the same update to float rounding. It is
    used where the parameters are plain tensors on one CPU or CUDA device (the DDP engine);
    DeepSpeed's optimizer wrappers keep the default.
    """
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    extra = {"fused": True} if fused else {}
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, **extra)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, **extra)


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `train.steps`."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
