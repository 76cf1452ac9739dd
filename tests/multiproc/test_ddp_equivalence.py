"""2 ranks x batch B must give the same parameters as 1 process x batch 2B on the same samples."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.multiproc.spawn import spawn
from unetdist.config import load_config

STEPS, PER_RANK = 3, 2


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        image = torch.randn(2 * PER_RANK, 1, 40, 36, generator=gen)
        label = (image[:, 0] > 0.3).long()  # learnable, so gradients are not noise
        out.append({"image": image, "label": label})
    return out


def _train(out_path: str, overrides: list[str]) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.trainer import build_trainer

    cfg = load_config(None, overrides)
    env = init_distributed()
    try:
        trainer = build_trainer(cfg, env)
        lo, hi = (env.rank * PER_RANK, (env.rank + 1) * PER_RANK) if env.distributed else (0, 2 * PER_RANK)
        for batch in _batches():
            trainer.train_step({k: v[lo:hi] for k, v in batch.items()})
        if env.is_main:
            torch.save(trainer.module.state_dict(), out_path)
    finally:
        destroy_distributed()


OVERRIDES = [
    # SGD: its update is linear in the gradient, so the comparison measures DDP, not Adam's
    # amplification of float noise in near-zero gradients (g / sqrt(v) for |g| ~ eps).
    "model.norm=group", "model.base_width=8", "model.depth=2", "train.optimizer=sgd", "train.momentum=0.9",
    "train.lr=0.05", "train.warmup_steps=0",
    "train.steps=3", "train.grad_clip=0.5", "train.dice_weight=1.0",
]


def test_two_ranks_equal_one_process_with_global_batch(tmp_path: Path) -> None:
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    spawn(_train, 1, str(single), OVERRIDES)
    spawn(_train, 2, str(double), OVERRIDES)
    a, b = torch.load(single), torch.load(double)
    init = _init_state()
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
        moved += int(not torch.equal(a[key], init[key]))
    assert moved > 0.9 * len(a), "the training steps did not change the parameters"


def _init_state() -> dict[str, torch.Tensor]:
    from unetdist.model import UNet
    from unetdist.train.trainer import seed_everything

    cfg = load_config(None, OVERRIDES)
    seed_everything(cfg.run.seed)
    return UNet(**cfg.model.hparams()).state_dict()
