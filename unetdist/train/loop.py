"""The run: data, trainer, resume, the step loop, validation, checkpoints, logs and final metrics.

Steps, not epochs, are the unit of progress: the data position of any step is
(epoch, batch) = divmod(step, batches_per_epoch), so a resumed run continues the exact stream.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import yaml

from unetdist.config import Config, ConfigError, to_dict
from unetdist.data.default import ensure_dataset
from unetdist.data.stream import Manifest, batches_per_epoch, open_manifest, train_loader, val_loader
from unetdist.parallel.collectives import barrier, broadcast_object
from unetdist.parallel.env import DistEnv
from unetdist.model.flops import train_step_flops_for
from unetdist.train.checkpoint import resolve_resume
from unetdist.train.logging import IntervalStats, RunLogger, prediction_grid, save_png
from unetdist.train.preemption import Preempted, StopSignal
from unetdist.train.trainer import Trainer, build_trainer

log = logging.getLogger(__name__)


def run(cfg: Config, env: DistEnv) -> dict[str, float]:
    """Train to `train.steps`, resuming where a previous run of the same folder stopped."""
    run_dir = Path(cfg.run.dir)
    manifest = _open_data(cfg)
    cfg = replace(cfg, model=replace(cfg.model, in_channels=manifest.channels, num_classes=manifest.num_classes))
    trainer = build_trainer(cfg, env)
    _resume(cfg, env, trainer, run_dir / "checkpoints")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    logger = RunLogger(run_dir / "tb" if env.is_main else None, cfg.train.steps, trainer.step)
    logger.config(yaml.safe_dump(to_dict(cfg), sort_keys=False), _hparams(cfg, env))
    stop_signal = StopSignal()
    try:
        metrics = _train(cfg, env, trainer, manifest, logger, run_dir, stop_signal)
    finally:
        stop_signal.restore()
        logger.close()
    barrier(env)
    return metrics


def _hparams(cfg: Config, env: DistEnv) -> dict[str, float | int | str | bool]:
    return {
        "backend": cfg.parallel.backend,
        "zero_stage": cfg.parallel.deepspeed.zero_stage if cfg.parallel.backend == "deepspeed" else -1,
        "world_size": env.world_size,
        "global_batch": cfg.data.batch_size * env.world_size,
        "grad_accum": cfg.train.grad_accum,
        "precision": cfg.train.precision,
        "optimizer": cfg.train.optimizer,
        "lr": cfg.train.lr,
        "base_width": cfg.model.base_width,
        "depth": cfg.model.depth,
        "norm": cfg.model.norm,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "tile": cfg.data.shard.tile,
    }


def _open_data(cfg: Config) -> Manifest:
    root = ensure_dataset(cfg.data, cfg.model.num_classes)
    manifest = open_manifest(root, cfg.data)
    if cfg.model.in_channels is not None and manifest.channels != cfg.model.in_channels:
        raise ConfigError(
            f"data in {root} has {manifest.channels} channel(s) but model.in_channels={cfg.model.in_channels}; "
            f"set model.in_channels={manifest.channels}"
        )
    if cfg.train.weight_map and not manifest.weights:
        raise ConfigError(f"train.weight_map=true but the shards in {root} hold no weight maps; "
                          "re-shard with --weight-map (data.shard.weight_map=true) or set train.weight_map=false")
    if cfg.model.num_classes is not None and manifest.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"data in {root} has {manifest.num_classes} classes but model.num_classes={cfg.model.num_classes}; "
            f"set model.num_classes={manifest.num_classes}"
        )
    return manifest


def _resume(cfg: Config, env: DistEnv, trainer: Trainer, ckpt_dir: Path) -> None:
    path = resolve_resume(cfg.run.resume, ckpt_dir) if env.is_main else None
    path = broadcast_object(env, path)
    if path is None:
        return
    state = trainer.load(Path(path))
    if env.is_main:
        log.info("resumed from %s at step %d", path, trainer.step)
        if state.get("world_size") != env.world_size:
            log.warning(
                "checkpoint was written by %s ranks, this run has %d: the data stream position is recomputed",
                state.get("world_size"), env.world_size,
            )


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _train(cfg: Config, env: DistEnv, trainer: Trainer, manifest: Manifest, logger: RunLogger, run_dir: Path,
           stop_signal: StopSignal) -> dict[str, float]:
    total, per_epoch = cfg.train.steps, batches_per_epoch(cfg.data, manifest, env.world_size)
    stop = min(total, cfg.run.stop_at) if cfg.run.stop_at > 0 else total
    interval = IntervalStats(env)
    interval.prepare(trainer.engine.amp_dtype)
    metrics: dict[str, float] = {}
    while trainer.step < stop:
        epoch, start = divmod(trainer.step, per_epoch)
        batches = iter(train_loader(cfg.data, manifest, rank=env.rank, world_size=env.world_size,
                                    seed=cfg.run.seed, epoch=epoch, start_batch=start,
                                    pin_memory=env.device.type == "cuda"))
        while trainer.step < stop:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            wait = time.perf_counter() - t0
            out = trainer.train_step(batch)
            interval.add(batch, out, wait)
            step = trainer.step
            if _due(step, cfg.train.log_every, total):
                height, width = batch["image"].shape[-2:]
                flops = train_step_flops_for(cfg.model.hparams(), height, width, 1, cfg.train.activation_checkpointing)
                values = interval.report(out, epoch, flops, trainer.engine.amp_dtype)
                logger.scalars(step, values, "train")
                logger.progress(step, {k: values[k] for k in ("loss", "lr", "images_per_s")})
            if _due(step, cfg.train.val_every, total):
                metrics = _validate(cfg, env, trainer, manifest, logger, run_dir)
                interval.throughput.reset()
            saved = _due(step, cfg.train.ckpt_every, total) or step == stop
            if saved:
                _save(cfg, env, trainer, manifest, run_dir / "checkpoints")
            if step < total and stop_signal.agreed(env):
                if not saved:
                    _save(cfg, env, trainer, manifest, run_dir / "checkpoints")
                logger.message(f"stop signal: checkpoint at step {step} written; resume with run.resume=auto")
                raise Preempted(step)
    if trainer.step == total and not metrics:  # resumed a finished run: report it again
        metrics = _validate(cfg, env, trainer, manifest, logger, run_dir)
    if env.is_main and trainer.step == total:
        (run_dir / "metrics.json").write_text(json.dumps({"step": trainer.step, **metrics}, indent=2))
    return metrics


def _validate(cfg: Config, env: DistEnv, trainer: Trainer, manifest: Manifest, logger: RunLogger, run_dir: Path) -> dict[str, float]:
    batches = val_loader(cfg.data, manifest, rank=env.rank, world_size=env.world_size,
                         pin_memory=env.device.type == "cuda")
    metrics, samples = trainer.evaluate(batches, keep=cfg.train.image_grid if env.is_main else 0)
    logger.scalars(trainer.step, metrics, "val")
    logger.message(
        f"validation at step {trainer.step}: dice/foreground={metrics['dice/foreground']:.4f} "
        f"iou/foreground={metrics['iou/foreground']:.4f} loss={metrics['loss']:.4f}"
    )
    if env.is_main and samples:
        grid = prediction_grid(samples, cfg.model.num_classes)
        logger.image_grid(trainer.step, grid)
        save_png(grid, run_dir / "predictions.png")
    return metrics


def _save(cfg: Config, env: DistEnv, trainer: Trainer, manifest: Manifest, ckpt_dir: Path) -> None:
    trainer.save(ckpt_dir, {"data": manifest.checkpoint_info(cfg.data.normalize)})  # collective: every rank takes part
    barrier(env)
