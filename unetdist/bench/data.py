"""The tiles both trainers read, and our trainer built for one benchmark row.

Why this module exists: "the same tiles" means one source. The synthetic 16-bit dataset is made
and sharded by the project's own code (``ensure_dataset``); the reference reads exactly the
training tiles of those shards, written out as one 16-bit PNG image and one 8-bit PNG mask per
tile (what a Pytorch-UNet user has on disk). Our trainer is built by ``build_trainer`` from a
config made of dotted overrides, as a user would write them.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetdist.bench.presets import Preset
from unetdist.config import Config, TrainConfig, UsageError, load_config
from unetdist.parallel.env import DistEnv

log = logging.getLogger(__name__)

DONE = ".complete"


@dataclass(frozen=True)
class Lever:
    """The settings of one row of our trainer; ``Lever()`` is our default configuration."""

    precision: str = TrainConfig.precision  # fp32 | bf16 | fp16
    channels_last: bool = TrainConfig.channels_last
    checkpointing: str = TrainConfig.activation_checkpointing  # none | highres | all
    compile: bool = bool(TrainConfig.compile)

    @property
    def label(self) -> str:
        parts = [self.precision] + (["channels_last"] if self.channels_last else []) + \
            (["compile"] if self.compile else [])
        text = "+".join(parts)
        return text if self.checkpointing == "none" else f"{text} ckpt={self.checkpointing}"

    @property
    def autocast_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def bench_config(preset: Preset, data_root: Path, run_dir: Path, lever: Lever = Lever(),
                 extra: tuple[str, ...] = ()) -> Config:
    """Our config for a row: the preset's model and data, the lever's precision/format/checkpointing."""
    overrides = [
        f"run.dir={run_dir}", "run.seed=0", "run.resume=never",
        "model.in_channels=1", "model.num_classes=2", f"model.base_width={preset.base_width}", "model.depth=4",
        "model.bilinear=false", "model.norm=batch",
        f"data.root={data_root}", "data.generate=true", f"data.batch_size={preset.batch}",
        f"data.workers={preset.workers}", "data.shuffle_buffer=64", "data.augment=true",
        f"data.synth.images={preset.images}", f"data.synth.height={preset.image_size}",
        f"data.synth.width={preset.image_size}", "data.synth.seed=0", "data.synth.boundary=false",
        f"data.shard.tile={preset.tile}", "data.shard.overlap=0", "data.shard.val_fraction=0.25",
        "train.steps=100000", "train.optimizer=adamw", "train.lr=0.001", "train.warmup_steps=10",
        f"train.precision={lever.precision}", f"train.channels_last={str(lever.channels_last).lower()}",
        f"train.activation_checkpointing={lever.checkpointing}", f"train.compile={str(lever.compile).lower()}",
        *extra,
    ]
    return load_config(None, overrides)


def single_env(device: torch.device) -> DistEnv:
    """This process alone on ``device`` (the benchmark's own rows never join a process group)."""
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)


def build_our_trainer(cfg: Config, env: DistEnv, lever: Lever) -> Any:
    """``build_trainer`` as a run builds it (``train.compile`` from the lever is in ``cfg``)."""
    from unetdist.train.trainer import build_trainer

    return build_trainer(cfg, env)


@dataclass(frozen=True)
class BenchData:
    """The prepared dataset: shards + manifest for ours, one PNG pair per training tile for the reference."""

    root: Path
    reference_dir: Path
    train_tiles: int


def prepare_data(preset: Preset, data_root: Path, run_dir: Path) -> BenchData:
    """Make (once) the synthetic shards and the reference's PNG tiles; reuse them when complete."""
    from unetdist.data.default import ensure_dataset
    from unetdist.data.stream import open_manifest

    cfg = bench_config(preset, data_root, run_dir)
    ensure_dataset(cfg.data, cfg.model.num_classes)
    manifest = open_manifest(data_root, cfg.data)
    if manifest.tile != preset.tile:
        raise UsageError(f"{data_root} holds {manifest.tile}px tiles but preset {preset.name} needs {preset.tile}px; "
                         "give another --data-dir")
    reference_dir = data_root / "reference-png"
    if not (reference_dir / DONE).is_file():
        count = write_reference_tiles(list(manifest.train_shards), reference_dir)
        log.info("wrote %d reference PNG tile pairs to %s", count, reference_dir)
    count = len(list((reference_dir / "imgs").iterdir()))
    return BenchData(root=data_root, reference_dir=reference_dir, train_tiles=count)


def write_reference_tiles(shard_urls: list[str], out_dir: Path) -> int:
    """Every sample of the shards as ``imgs/<key>.png`` (16-bit) and ``masks/<key>.png`` (8-bit)."""
    from PIL import Image

    from unetdist.data.stream import shard_samples

    (out_dir / "imgs").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    count = 0
    for url in shard_urls:
        for sample in shard_samples(url):
            image = np.load(io.BytesIO(sample["img.npy"]), allow_pickle=False)
            label = np.load(io.BytesIO(sample["lbl.npy"]), allow_pickle=False)
            if image.ndim == 3:
                if image.shape[0] != 1:
                    raise ValueError("reference tiles: only 1-channel images are written as PNG")
                image = image[0]
            name = sample["__key__"].replace("/", "_")
            Image.fromarray(image.astype(np.uint16)).save(out_dir / "imgs" / f"{name}.png")
            Image.fromarray(label.astype(np.uint8)).save(out_dir / "masks" / f"{name}.png")
            count += 1
    (out_dir / DONE).write_text(f"{count}\n")
    return count


def first_batch(cfg: Config, device: torch.device) -> dict[str, Any]:
    """One real training batch of our loader (for the rows that time the step alone)."""
    batches = our_batches(cfg, device)
    batch = next(batches)
    batches.close()
    return {"image": batch["image"], "label": batch["label"]}


def our_batches(cfg: Config, device: torch.device) -> Any:
    """Our training stream, epoch after epoch (a generator; ``close()`` it when done)."""
    from unetdist.data.stream import open_manifest, run_loader

    manifest = open_manifest(cfg.data.root, cfg.data)
    yield from run_loader(cfg.data, manifest, rank=0, world_size=1, seed=cfg.run.seed, stop_step=10**12,
                          pin_memory=device.type == "cuda")
