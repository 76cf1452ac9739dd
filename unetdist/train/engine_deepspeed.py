"""DeepSpeed engine adapter: the same interface as the DDP engine, so one trainer serves both.

The engine gets our model (already prepared: activation checkpointing with the BatchNorm
guard, device, memory format), our torch optimizer and LR schedule unless the config asks for
DeepSpeed's, and a DeepSpeed config generated from ours.

Checkpoints use DeepSpeed's `save_checkpoint`/`load_checkpoint` (per-rank ZeRO shards) into the
folder `unetdist.train.checkpoint` names; that module commits, discovers and prunes the folders.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetdist.config import Config
from unetdist.parallel.deepspeed_config import check_deepspeed_version, deepspeed_config
from unetdist.parallel.env import DistEnv
from unetdist.parallel.parallelize import prepare_module
from unetdist.parallel.precision import cuda_capability, resolve_precision
from unetdist.model import UNet
from unetdist.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def _import_deepspeed(env: DistEnv, ds_config: dict[str, Any]) -> Any:
    import deepspeed

    check_deepspeed_version(deepspeed.__version__, ds_config)

    # DeepSpeed's ZeRO collectives call torch names that torch 2.13 deprecates, once per step per rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    if not env.is_main:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    if env.device.type == "cpu":
        # The shared-memory all-reduce op only speeds up CPU inference and costs a ~2 minute JIT build on
        # first start; without it DeepSpeed uses the gloo group we already created.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _grad_scaler(engine: Any) -> torch.amp.GradScaler | None:
    """The GradScaler DeepSpeed made for float16 autocast: the engine's without ZeRO, the optimizer's with it."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is None:
        scaler = getattr(engine.optimizer, "torch_autocast_gradscaler", None)
    return scaler


class DeepSpeedEngine:
    """ZeRO stages 0-3, fp32 / bf16 autocast / fp16 with dynamic loss scaling, gradient accumulation."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module) -> None:
        self.cfg, self.env = cfg, env
        self.stage = cfg.parallel.deepspeed.zero_stage
        self.ds_config = deepspeed_config(cfg, env.world_size, env.device.type, cuda_capability(env.device))
        deepspeed = _import_deepspeed(env, self.ds_config)
        model = prepare_module(model, cfg.train, cfg.parallel, env)
        optimizer = scheduler = None
        if cfg.parallel.deepspeed.optimizer == "torch":
            optimizer = build_optimizer(list(model.parameters()), cfg.train)
            if cfg.parallel.deepspeed.scheduler == "torch":
                scheduler = build_scheduler(optimizer, cfg.train)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            model_parameters=None if optimizer is not None else list(model.parameters()),
            dist_init_required=False,
        )
        # Autocast for evaluation only: in training DeepSpeed applies its own (torch_autocast section),
        # chosen by the same function, so validation and MFU use the dtype training ran in.
        self.amp_dtype = resolve_precision(cfg.train.precision, env.device)
        self._scaler = _grad_scaler(self.engine)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.engine(image)

    def accumulate(self, last: bool) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # DeepSpeed counts micro-steps and reduces at the boundary itself

    def backward(self, loss: torch.Tensor, micro_steps: int) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-steps in step(); only the boundary one updates weights

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):  # ZeRO 1/2: a device tensor; float() here would sync every step
            return norm.detach()
        return torch.tensor(float("nan") if norm is None else float(norm))

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def loss_scale(self) -> float | None:
        return float(self._scaler.get_scale()) if self._scaler is not None else None

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def eval_module(self) -> nn.Module:
        """The module itself, or under ZeRO-3 a full copy gathered once (its layers are partitioned)."""
        if self.stage < 3:
            return self.engine.module
        import deepspeed

        copy = UNet(**self.engine.module.hparams).to(self.env.device)
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            copy.load_state_dict({k: v.detach().clone() for k, v in self.engine.module.state_dict().items()})
        return copy

    def save_to(self, folder: Path, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its shard of this step into `folder` (DeepSpeed's format)."""
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client_state, save_latest=False)

    def load_from(self, folder: Path) -> dict[str, Any]:
        """Collective: every rank loads its shard; returns the client state saved with it."""
        load_path, client_state = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
        return client_state
