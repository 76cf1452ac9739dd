"""Trainer: one optimisation step, evaluation and the state that resumes them.

Building is separate from running (`build_trainer`), and the trainer knows nothing of data
streams, logging or files: the run loop in `loop.py` feeds it batches and persists its state.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import asdict
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from unetdist.config import Config, to_dict
from unetdist.dist.env import DistEnv
from unetdist.dist.parallelize import parallelize, unwrap
from unetdist.model import UNet
from unetdist.train.metrics import ConfusionCounter, segmentation_loss
from unetdist.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on this device (None: fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


class Trainer:
    """Holds the parallelised model, optimizer, LR schedule and loss scaler, and the step count."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        amp_dtype: torch.dtype | None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.step = 0

    @property
    def module(self) -> nn.Module:
        return unwrap(self.model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"].to(self.env.device, non_blocking=True)
        if self.cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return image, batch["label"].to(self.env.device, non_blocking=True)

    def _pixel_weight(self, batch: Batch) -> torch.Tensor | None:
        if not self.cfg.train.weight_map:
            return None
        if "weight" not in batch:
            raise ValueError("train.weight_map=true but the data has no weight maps; shard with weight maps "
                             "or set train.weight_map=false")
        return batch["weight"].to(self.env.device, non_blocking=True)

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward, backward, clip, step. Returns device tensors so the caller decides when to sync."""
        self.model.train()
        image, label = self._to_device(batch)
        with self._autocast():
            logits = self.model(image)
        loss = segmentation_loss(logits, label, self.cfg.train.dice_weight, self._pixel_weight(batch))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = torch.tensor(self.optimizer.param_groups[0]["lr"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        out = {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": lr}
        if self.scaler is not None:
            out["loss_scale"] = torch.tensor(self.scaler.get_scale())
        return out

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], keep: int = 0) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Metrics over `batches` from global counts; also returns up to `keep` (image, label, pred) on CPU."""
        self.model.eval()
        self._sync_buffers()
        counter = ConfusionCounter(self.cfg.model.num_classes, self.env.device)
        kept: list[torch.Tensor] = []
        for batch in batches:
            image, label = self._to_device(batch)
            with self._autocast():
                logits = self.module(image)  # no DDP forward: ranks may see different batch counts
            per_sample = segmentation_loss(logits, label, self.cfg.train.dice_weight, self._pixel_weight(batch))
            per_sample = per_sample * label.shape[0]
            counter.update(logits.float(), label, per_sample)
            if len(kept) < keep:
                n = keep - len(kept)
                pred = logits.argmax(1)
                kept.extend(torch.stack([image[i, 0].float(), label[i].float(), pred[i].float()]).cpu() for i in range(min(n, len(label))))
        counter.all_reduce()
        return counter.summary(), kept

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics (DDP only syncs them at the next forward)."""
        if self.env.distributed:
            for buffer in self.module.buffers():
                dist.broadcast(buffer, 0)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; collective (gathers every rank's RNG state), call on all ranks."""
        rng = _rng_state(self.env.device)
        if self.env.distributed:
            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "step": self.step,
            "world_size": self.env.world_size,
            "rng": gathered,
            "config": to_dict(self.cfg),
            "model_hparams": asdict(self.cfg.model),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rngs = state.get("rng") or []
        if len(rngs) == self.env.world_size:
            _set_rng_state(rngs[self.env.rank], self.env.device)
        elif self.env.is_main:
            log.warning("checkpoint has RNG states for %d ranks, this run has %d: RNG not restored", len(rngs), self.env.world_size)


def build_trainer(cfg: Config, env: DistEnv) -> Trainer:
    """Seed, build the model (same initial weights on every rank), parallelise it, and its optimizer."""
    seed_everything(cfg.run.seed)
    model = UNet(**asdict(cfg.model))
    model = parallelize(model, cfg.train, cfg.parallel, env)
    optimizer = build_optimizer(list(model.parameters()), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    return Trainer(cfg, env, model, optimizer, scheduler, resolve_precision(cfg.train.precision, env.device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [algo, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    algo, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algo, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
