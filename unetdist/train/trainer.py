"""Trainer: one optimisation step, evaluation and the state that resumes them.

Building is separate from running (`build_trainer`), and the trainer knows nothing of data
streams, logging or files: the run loop in `loop.py` feeds it batches, and the backend engine
(`engine.TorchEngine` for DDP, `unetdist.train.engine_deepspeed.DeepSpeedEngine`) does the
backend-specific work behind one interface, so there is one training loop for both.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from unetdist.config import Config, to_dict
from unetdist.data.augment_batch import spatial_batch
from unetdist.parallel.collectives import all_gather_object, barrier, broadcast_
from unetdist.parallel.env import DistEnv, cpu_threads_per_rank
from unetdist.model import UNet
from unetdist.train.checkpoint import load_training, save_training
from unetdist.train.engine_ddp import Engine, TorchEngine
from unetdist.train.logging import GridSamples
from unetdist.train.metrics import ConfusionCounter, segmentation_loss

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class Trainer:
    """Drives an engine through micro-steps and evaluation; owns the step count and RNG state."""

    def __init__(self, cfg: Config, env: DistEnv, engine: Engine) -> None:
        self.cfg = cfg
        self.env = env
        self.engine = engine
        self.step = 0

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.engine.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.engine.amp_dtype)

    def _to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        image = batch["image"].to(self.env.device, non_blocking=True)
        label = batch["label"].to(self.env.device, non_blocking=True)
        weight = self._pixel_weight(batch)
        if "spatial" in batch:  # data.augment.device: the loader drew the geometry, the device applies it
            crop = self.cfg.data.augment.crop or label.shape[-1]
            image, label, weight = spatial_batch(batch["spatial"].to(self.env.device, non_blocking=True), crop,
                                                 image, label, weight)
        if self.cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return image, label, weight

    def _pixel_weight(self, batch: Batch) -> torch.Tensor | None:
        if not self.cfg.train.weight_map:
            return None
        if "weight" not in batch:
            raise ValueError("train.weight_map=true but the data has no weight maps; shard with weight maps "
                             "or set train.weight_map=false")
        return batch["weight"].to(self.env.device, non_blocking=True)

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimizer step over `batch`, split into `train.grad_accum` micro-batches.

        Returns device tensors so the caller decides when to synchronise.
        """
        image, label, weight = self._to_device(batch)
        micro_steps = self.cfg.train.grad_accum
        self.module.train()
        lr = self.engine.lr
        losses = []
        for i, (x, y) in enumerate(zip(image.chunk(micro_steps), label.chunk(micro_steps))):
            w = weight.chunk(micro_steps)[i] if weight is not None else None
            with self.engine.accumulate(last=i == micro_steps - 1):
                logits = self.engine.forward(x)
                loss = segmentation_loss(logits, y, self.cfg.train.dice_weight, w)
                self.engine.backward(loss, micro_steps)
            losses.append(loss.detach())
        grad_norm = self.engine.step()
        self.step += 1
        out = {"loss": torch.stack(losses).mean(), "grad_norm": grad_norm, "lr": torch.tensor(lr)}
        scale = self.engine.loss_scale
        if scale is not None:
            out["loss_scale"] = torch.tensor(scale)
        return out

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], keep: int = 0) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Metrics over `batches` from global counts; also returns up to `keep` (image, label, pred) on CPU.

        Uses a plain module (no DDP forward, no ZeRO-3 gathering per layer), so ranks that see
        different numbers of validation batches never wait on each other inside the loop.
        """
        module = self.engine.eval_module()
        module.eval()
        broadcast_(self.env, module.buffers())  # rank 0's BatchNorm statistics everywhere, as checkpoints hold them
        counter = ConfusionCounter(self.cfg.model.hparams()["num_classes"], self.env.device)
        kept = GridSamples(keep)
        for batch in batches:
            image, label, weight = self._to_device(batch)
            with self._autocast():
                logits = module(image)
            loss = segmentation_loss(logits, label, self.cfg.train.dice_weight, weight) * label.shape[0]
            counter.update(logits.float(), label, loss)
            counter.skipped += int(batch.get("skipped", 0))
            if keep and not kept.full:
                kept.offer(image, label, logits.argmax(1))
        module.train()
        counter.all_reduce(self.env)
        return counter.summary(), kept.samples()

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        """Collective: every rank contributes its RNG state; the engine writes its checkpoint format."""
        rng = _rng_state(self.env.device)
        gathered = all_gather_object(self.env, rng)
        client_state = {
            "step": self.step,
            "world_size": self.env.world_size,
            "rng": gathered,
            "config": to_dict(self.cfg),
            "model_hparams": self.cfg.model.hparams(),
            **extra,
        }
        save_training(self.engine, directory, self.step, client_state, self.cfg.train.keep_last,
                      self.env.is_main, lambda: barrier(self.env))

    def load(self, path: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore from a checkpoint; `state` is its content when the caller has already read it."""
        state = load_training(self.engine, path, state)
        self.step = int(state["step"])
        rngs = state.get("rng") or []
        if len(rngs) == self.env.world_size:
            _set_rng_state(rngs[self.env.rank], self.env.device)
        elif self.env.is_main:
            log.warning("checkpoint has RNG states for %d ranks, this run has %d: RNG not restored", len(rngs), self.env.world_size)
        return state


def build_engine(cfg: Config, env: DistEnv, model: nn.Module) -> Engine:
    if cfg.parallel.backend == "deepspeed":
        from unetdist.train.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env, model)
    return TorchEngine(cfg, env, model)


def build_trainer(cfg: Config, env: DistEnv) -> Trainer:
    """Seed, build the model (same initial weights on every rank) and the backend engine around it."""
    threads = cpu_threads_per_rank(env.local_world_size)
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(cfg.run.seed)
    model = UNet(**cfg.model.hparams())
    return Trainer(cfg, env, build_engine(cfg, env, model))


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
