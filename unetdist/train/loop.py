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
from unetdist.data.order import per_device_batch
from unetdist.data.stream import Manifest, batches_per_epoch, open_manifest, run_loader, val_loader
from unetdist.parallel.collectives import barrier, broadcast_object
from unetdist.parallel.env import DistEnv
from unetdist.parallel.node import sample_bytes, warn_if_overloaded
from unetdist.parallel.shared_dir import check_shared_run_dir
from unetdist.train.checkpoint import CheckpointError, select_resume
from unetdist.train.fingerprint import check_resume, current
from unetdist.train.logging import IntervalStats, RunLogger, prediction_grid, save_png, step_flops_per_image
from unetdist.train.preemption import Preempted, StopSignal
from unetdist.train.runlock import RunLock
from unetdist.train.trainer import Trainer, build_trainer

log = logging.getLogger(__name__)


def run(cfg: Config, env: DistEnv) -> dict[str, float]:
    """Train to `train.steps`, resuming where a previous run of the same folder stopped."""
    run_dir = Path(cfg.run.dir)
    if env.world_size > env.local_world_size:  # several nodes: resume and checkpoints need one shared run.dir
        check_shared_run_dir(env, run_dir)
    # with data.global_batch, the per-device batch follows the world size (the saved config records it)
    cfg.data.batch_size = per_device_batch(cfg.data.batch_size, cfg.data.global_batch, env.world_size,
                                           cfg.train.grad_accum)
    lock = _lock(env, run_dir)
    try:
        manifest = _open_data(cfg)
        cfg = replace(cfg, model=replace(cfg.model, in_channels=manifest.channels, num_classes=manifest.num_classes))
        if env.is_main:
            per_worker = batches_per_epoch(cfg.data, manifest, env.world_size) * cfg.data.batch_size // max(1, cfg.data.workers)
            warn_if_overloaded(env.local_world_size, cfg.data.workers, cfg.data.shuffle_buffer,
                               sample_bytes(manifest.tile, manifest.channels, manifest.dtype, manifest.weights), per_worker)
        start = _select_checkpoint(cfg, env, manifest, run_dir / "checkpoints")
        trainer = build_trainer(cfg, env)
        if start is not None:
            _resume(cfg, env, trainer, *start)
        if env.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        metrics = _run_logged(cfg, env, trainer, manifest, run_dir)
        barrier(env)
        return metrics
    finally:
        lock.release()


def _run_logged(cfg: Config, env: DistEnv, trainer: Trainer, manifest: Manifest, run_dir: Path) -> dict[str, float]:
    logger = RunLogger(run_dir / "tb" if env.is_main else None, cfg.train.steps, trainer.step)
    logger.config(yaml.safe_dump(to_dict(cfg), sort_keys=False), _hparams(cfg, env, manifest))
    stop_signal = StopSignal(every=cfg.train.stop_check_every)
    try:
        return _train(cfg, env, trainer, manifest, logger, run_dir, stop_signal)
    except Preempted:
        raise
    except Exception as exc:
        if stop_signal.received:  # e.g. torchrun tearing down a group whose other members died
            raise Preempted(trainer.step, stop_signal.received, checkpoint=False) from exc
        raise
    finally:
        stop_signal.restore()
        logger.close()


def _lock(env: DistEnv, run_dir: Path) -> RunLock:
    """Rank 0 locks the run folder; every rank fails alike when another run holds it."""
    lock = RunLock(run_dir)
    error = None
    if env.is_main:
        try:
            lock.acquire()
        except ConfigError as exc:
            error = str(exc)
    error = broadcast_object(env, error)
    if error:
        raise ConfigError(str(error))
    return lock


def _hparams(cfg: Config, env: DistEnv, manifest: Manifest) -> dict[str, float | int | str | bool]:
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
        "tile": manifest.tile,
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
    if manifest.tile != cfg.data.shard.tile:
        raise ConfigError(f"data.shard.tile={cfg.data.shard.tile} but the dataset in {root} was cut into "
                          f"{manifest.tile}-px tiles; set data.shard.tile={manifest.tile}, or re-shard the images")
    if cfg.model.num_classes is not None and manifest.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"data in {root} has {manifest.num_classes} classes but model.num_classes={cfg.model.num_classes}; "
            f"set model.num_classes={manifest.num_classes}"
        )
    return manifest


def _select_checkpoint(cfg: Config, env: DistEnv, manifest: Manifest,
                       ckpt_dir: Path) -> tuple[Path, dict | None] | None:
    """Rank 0 finds the checkpoint to start from and checks it continues this run; every rank gets the path.

    Rank 0 keeps what it read (for a DDP file, the whole state) so the file is read once there.
    """
    found, error = None, None
    if env.is_main:
        try:
            found = select_resume(cfg.run.resume, ckpt_dir)
            if found is not None:
                check_resume(found[1], found[0], cfg, manifest.checkpoint_info(), env.world_size)
        except (ConfigError, CheckpointError) as exc:
            error = exc
    shared = broadcast_object(env, (None if found is None else str(found[0]), error))
    path, error = shared  # type: ignore[misc]
    if error is not None:
        raise error
    if path is None:
        return None
    return Path(path), (found[1] if found is not None and not Path(path).is_dir() else None)


def _resume(cfg: Config, env: DistEnv, trainer: Trainer, path: Path, state: dict | None) -> None:
    state = trainer.load(path, state)
    if env.is_main:
        log.info("resumed from %s at step %d", path, trainer.step)
        _check_data_order(cfg, env, state)


def _check_data_order(cfg: Config, env: DistEnv, state: dict) -> None:
    """Say whether the data order continues exactly: it does when the global batch and partitions are kept."""
    saved = (state.get("config") or {}).get("data") or {}
    if "batch_size" not in saved or state.get("world_size") is None:
        return
    before = int(saved["batch_size"]) * int(state["world_size"])
    now = cfg.data.batch_size * env.world_size
    if before != now or int(saved.get("partitions", 0)) != cfg.data.partitions:
        log.warning("the checkpoint's global batch was %d (data.partitions=%s), this run's is %d (%d): the data "
                    "order from here differs from the unbroken run's; set data.batch_size=%s to continue it exactly",
                    before, saved.get("partitions", 0), now, cfg.data.partitions,
                    f"{before // env.world_size}" if before % env.world_size == 0 else "<global batch / ranks>")
    elif state["world_size"] != env.world_size:
        log.info("checkpoint written by %s ranks, resumed on %d with the same global batch %d: "
                 "the data order continues unchanged", state["world_size"], env.world_size, now)


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _train(cfg: Config, env: DistEnv, trainer: Trainer, manifest: Manifest, logger: RunLogger, run_dir: Path,
           stop_signal: StopSignal) -> dict[str, float]:
    total, per_epoch = cfg.train.steps, batches_per_epoch(cfg.data, manifest, env.world_size)
    stop = min(total, cfg.run.stop_at) if cfg.run.stop_at > 0 else total
    interval = IntervalStats(env)
    interval.prepare(trainer.engine.amp_dtype)
    metrics: dict[str, float] = {}
    # one loader for the whole run: its workers carry on into the next epoch (see run_loader)
    if trainer.step < stop:
        batches = iter(run_loader(cfg.data, manifest, rank=env.rank, world_size=env.world_size, seed=cfg.run.seed,
                                  start_step=trainer.step, stop_step=stop, pin_memory=env.device.type == "cuda"))
    while trainer.step < stop:
        epoch = trainer.step // per_epoch  # of the batch this step trains on
        t0 = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t0
        out = trainer.train_step(batch)
        interval.add(batch, out, wait)
        step = trainer.step
        if _due(step, cfg.train.log_every, total):
            height, width = batch["image"].shape[-2:]
            flops = step_flops_per_image(cfg.model.hparams(), height, width, cfg.train.activation_checkpointing)
            values = interval.report(out, epoch, flops, trainer.engine.amp_dtype)
            logger.scalars(step, values, "train")
            logger.progress(step, {k: values[k] for k in ("loss", "lr", "images_per_s")})
        if _due(step, cfg.train.val_every, total):
            metrics = _validate(cfg, env, trainer, manifest, logger, run_dir)
            interval.throughput.reset()
        saved = _due(step, cfg.train.ckpt_every, total) or step == stop
        if saved:
            _save(cfg, env, trainer, manifest, run_dir / "checkpoints")
        signum = stop_signal.agreed(env, step, force=saved) if step < total else 0
        if signum:
            if not saved:
                _save(cfg, env, trainer, manifest, run_dir / "checkpoints")
            logger.message(f"stop signal: checkpoint at step {step} written; resume with run.resume=auto")
            raise Preempted(step, signum)
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
    info = manifest.checkpoint_info(cfg.data.normalize)
    trainer.save(ckpt_dir, {"data": info, "fingerprint": current(cfg, info, env.world_size)})  # collective: every rank takes part
    barrier(env)
