"""What a checkpoint was trained with, so that a resume never silently continues a different run.

Every checkpoint stores a fingerprint: the model settings (the weights only fit the same
architecture), the data set it read (root, tile, sample counts, channels, classes) and the
schedule (steps, optimizer, learning rate, global batch). The global batch, not the per-rank
batch, is compared: a job requeued onto another number of ranks with the same global batch continues
the same run. On resume a changed model is refused naming
the keys; a changed data set or schedule is refused unless `run.resume=force` (or an explicit
checkpoint path) says to go on; a checkpoint already past `train.steps` is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from unetdist.config import Config, ConfigError

log = logging.getLogger(__name__)

_SCHEDULE = ("steps", "optimizer", "lr", "weight_decay", "momentum", "warmup_steps", "min_lr_ratio", "grad_accum")
_DATA = ("tile", "train_samples", "val_samples", "channels", "num_classes", "dataset")


def _root(root: str) -> str:
    return root if "://" in root else os.path.abspath(root)


def fingerprint(config: dict[str, Any], data_info: dict[str, Any], world_size: int | None) -> dict[str, dict[str, Any]]:
    """{"model": {...}, "data": {...}, "schedule": {...}} from a resolved config dict and the data description.

    Works on plain dicts so that checkpoints written before fingerprints existed (which hold
    `config` and `data`) are checked the same way.
    """
    train, data = config.get("train", {}), config.get("data", {})
    return {
        "model": {f"model.{k}": v for k, v in sorted(config.get("model", {}).items())},
        "data": {"data.root": _root(str(data_info.get("root", data.get("root", "")))),
                 "data.train_urls": data.get("train_urls", ""), "data.val_urls": data.get("val_urls", ""),
                 **{f"dataset {k}": data_info.get(k) for k in _DATA}},
        "schedule": {"global batch (data.batch_size x ranks)": _global_batch(data.get("batch_size"), world_size),
                     **{f"train.{k}": train.get(k) for k in _SCHEDULE
                        if k != "momentum" or train.get("optimizer") == "sgd"}},
    }


def _global_batch(batch_size: Any, world_size: int | None) -> Any:
    return batch_size * world_size if isinstance(batch_size, int) and world_size else batch_size


def current(cfg: Config, data_info: dict[str, Any], world_size: int) -> dict[str, dict[str, Any]]:
    """The fingerprint of the run about to start on `world_size` ranks."""
    return fingerprint({"model": asdict(cfg.model), "data": asdict(cfg.data), "train": asdict(cfg.train)}, data_info,
                       world_size)


def differences(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Per group, `key: saved -> now` for every key whose value changed."""
    out: dict[str, list[str]] = {}
    for group, values in now.items():
        old = saved.get(group, {})
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in values.items() if k in old and old[k] != v]
        if changed:
            out[group] = changed
    return out


def check_resume(state: dict[str, Any], path: Path, cfg: Config, data_info: dict[str, Any], world_size: int) -> None:
    """Refuse a resume that would not continue the same run; see the module docstring for the rules."""
    step = int(state["step"])
    if step > cfg.train.steps:
        raise ConfigError(f"{path} is at step {step}, past train.steps={cfg.train.steps}: there is nothing left to "
                          f"train; raise train.steps (with run.resume=force), or use a new run.dir")
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        if not isinstance(state.get("config"), dict):
            log.warning("%s holds no fingerprint of its settings; resuming without checking them", path)
            return
        saved = fingerprint(state["config"], state.get("data") or {}, state.get("world_size"))
    diffs = differences(saved, current(cfg, data_info, world_size))
    if "model" in diffs:
        raise ConfigError(f"{path} was trained with another model ({'; '.join(diffs['model'])}): its weights cannot "
                          "be loaded; use a new run.dir, or run.resume=never to start afresh in this one")
    changed = diffs.get("data", []) + diffs.get("schedule", [])
    if not changed:
        return
    if cfg.run.resume == "auto":
        raise ConfigError(f"the data set or schedule changed since {path} ({'; '.join(changed)}); set "
                          "run.resume=force to continue from it with the new settings, or use a new run.dir")
    log.warning("continuing from %s with changed settings (run.resume=%s): %s", path, cfg.run.resume, "; ".join(changed))
