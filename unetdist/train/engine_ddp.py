"""The backend interface the trainer drives, and its DDP implementation.

One training loop serves every backend: an engine owns the wrapped model, the optimizer, the
LR schedule and loss scaling, and hands out / takes back their state; the files are the business
of `unetdist.train.checkpoint` (DeepSpeed's sharded folders stay DeepSpeed's format). The
DeepSpeed engine (`unetdist.train.engine_deepspeed`) implements the same interface.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from unetdist.config import Config
from unetdist.parallel.env import DistEnv
from unetdist.parallel.parallelize import prepare_module, unwrap, wrap_ddp
from unetdist.parallel.precision import resolve_precision
from unetdist.train.optim import build_optimizer, build_scheduler


class Engine(Protocol):
    """What the trainer needs from a backend."""

    amp_dtype: torch.dtype | None

    def forward(self, image: torch.Tensor) -> torch.Tensor: ...
    def accumulate(self, last: bool) -> AbstractContextManager[None]: ...
    def backward(self, loss: torch.Tensor, micro_steps: int) -> None: ...
    def step(self) -> torch.Tensor: ...
    @property
    def lr(self) -> float: ...
    @property
    def loss_scale(self) -> float | None: ...
    @property
    def module(self) -> nn.Module: ...
    def eval_module(self) -> nn.Module: ...
    # Checkpoint state, one of two forms (see unetdist.train.checkpoint.save_training):
    #   state_dict() -> dict / load_state_dict(dict)           rank 0 writes one file (DDP)
    #   save_to(folder, client_state) / load_from(folder)    every rank writes its shard (DeepSpeed)


class TorchEngine:
    """DDP (or a plain module alone), torch optimizer and LR schedule, GradScaler for fp16."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module) -> None:
        self.cfg, self.env = cfg, env
        self.model = wrap_ddp(prepare_module(model, cfg.train, cfg.parallel, env), cfg.parallel, env)
        self.optimizer = build_optimizer(list(self.model.parameters()), cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.amp_dtype = resolve_precision(cfg.train.precision, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.amp_dtype == torch.float16 else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            return self.model(image)
        with torch.autocast(self.env.device.type, dtype=self.amp_dtype):
            return self.model(image)

    def accumulate(self, last: bool) -> AbstractContextManager[None]:
        """Skip DDP's all-reduce on all but the last micro-step; gradients just add up locally."""
        if self.env.distributed and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, micro_steps: int) -> None:
        loss = loss / micro_steps
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    @property
    def module(self) -> nn.Module:
        return unwrap(self.model)

    def eval_module(self) -> nn.Module:
        return self.module

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, LR schedule and loss scaler: what a checkpoint file holds besides the client state."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
