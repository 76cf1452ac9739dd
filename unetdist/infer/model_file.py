"""Turning whatever a user points at (checkpoint, run folder, exported model) into a ready UNet.

Why this module exists: prediction, evaluation and `unetdist export` must agree on what a model
file is and on how its normalisation travels with it, so that nobody re-types intensity
statistics by hand. `load_model_file` is the one loader they all use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unetdist.config import UserError
from unetdist.data.normalize import IntensityStats, Normalization
from unetdist.model import UNet
from unetdist.train.checkpoint import MODEL_FORMAT as FORMAT  # one definition, shared with `unetdist export`
from unetdist.train.checkpoint import CheckpointError, read_newest
from unetdist.train.checkpoint import model_file_state as _model_file_state

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed wrappers, torch.compile


class ModelFileError(UserError, ValueError):
    """A model file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from and what it expects.

    Attributes:
        path: the checkpoint file or DeepSpeed folder actually read (the newest one when a run folder was given).
        kind: ``ddp-checkpoint``, ``deepspeed-checkpoint`` or ``model-file``.
        step: optimizer step of the checkpoint (None for exported files without one).
        hparams: ``UNet(**hparams)`` rebuilds the architecture.
        data: the dataset description saved with it (``manifest.checkpoint_info()``).
    """

    path: Path
    kind: str
    step: int | None
    hparams: dict[str, Any]
    data: dict[str, Any]

    @property
    def in_channels(self) -> int:
        return int(self.hparams["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.hparams["num_classes"])


def model_file_state(model: UNet, stats: Normalization | IntensityStats | dict[str, Any],
                     data: dict[str, Any] | None = None, step: int | None = None) -> dict[str, Any]:
    """The dict that `torch.save` writes as an exported model file (format ``unetdist-model-v1``).

    `stats`: the normalisation (dataset statistics alone mean the ``dataset`` mode). Built by
    `unetdist.train.checkpoint.model_file_state`, the one definition of the format;
    `unetdist.train.checkpoint.write_model_file` writes it atomically.
    """
    extra = {}
    if isinstance(stats, Normalization):
        extra, stats = {"normalization": stats.to_dict()}, stats.stats
    if isinstance(stats, IntensityStats):
        stats = stats.to_dict()
    return _model_file_state(model.state_dict(), model.hparams, {**(data or {}), "stats": dict(stats), **extra},
                             step=step)


def _read(path: Path) -> tuple[dict[str, Any], Path, str]:
    """(state, file or folder read, kind) for any accepted `path` (see `load_model_file`)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file, checkpoint or run folder")
    try:
        return read_newest(path)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ModelFileError(str(exc)) from exc
    except Exception as exc:  # DeepSpeed's stitching raises many types; name the path
        raise ModelFileError(f"{path}: cannot be read as a DeepSpeed checkpoint ({exc})") from exc


def load_model_file(path: str | Path) -> tuple[UNet, Normalization, ModelInfo]:
    """Load a UNet, the normalisation it was trained with (`Normalization`), and where it came from.

    Accepted: a DDP checkpoint ``runs/x/checkpoints/step_N.pt``; a run folder or its
    checkpoints folder (the newest checkpoint that reads; damaged newer ones are reported); a DeepSpeed checkpoint folder ``step_N`` at any
    ZeRO stage (stitched by `unetdist.train.checkpoint.read_weights`); and an
    exported model file (what `unetdist export` writes and `model_file_state` builds), a
    ``torch.save``d dict::

        {"format": "unetdist-model-v1",
         "model": state_dict,                          # UNet parameters and buffers, CPU tensors
         "model_hparams": {"in_channels": 1, "num_classes": 2, "base_width": 64, "depth": 4,
                           "bilinear": False, "norm": "batch"},   # UNet(**model_hparams)
         "data": {"stats": {"low": [...], "high": [...],          # one value per channel, see
                            "clipped_mean": [...], "clipped_std": [...]},  # training set statistics
                  "normalization": {"mode": "percentile",  # or {"mode": "dataset"}; absent: dataset
                                    "percentiles": [1.0, 99.8], "max_pixels": 4000000},
                  ...},                                # optionally the rest of manifest.checkpoint_info()
         "config": {...},                              # optional: the training run's resolved config
         "step": 1000}                                 # optional

    Every file, DeepSpeed's included, is read with ``torch.load(weights_only=True)``: a file that
    asks to run code is refused, naming what it asks for. The model is returned in eval mode on the CPU.

    Raises:
        FileNotFoundError: nothing at `path`.
        ModelFileError: unreadable file, not a unetdist UNet (other architecture or weights that
            do not fit the hyper-parameters), or no normalisation statistics. The message names the file.
    """
    state, file, kind = _read(Path(path))
    weights = _state_dict(state, file)
    hparams = state.get("model_hparams")
    if not isinstance(hparams, dict):
        raise ModelFileError(f"{file}: no 'model_hparams' entry; it is not a unetdist checkpoint or model file "
                             f"(top-level keys: {', '.join(sorted(map(str, state)))})")
    model = _build(hparams, weights, file)
    stats = _normalization(state, file, model.hparams["in_channels"])
    step = state.get("step")
    info = ModelInfo(file, kind, None if step is None else int(step), dict(model.hparams), dict(state.get("data") or {}))
    log.info("loaded %s (%s, step %s): UNet %s", file, kind, info.step, model.hparams)
    return model, stats, info


def _state_dict(state: dict[str, Any], file: Path) -> dict[str, torch.Tensor]:
    weights = state.get("model")
    if not isinstance(weights, dict) or not weights:
        raise ModelFileError(f"{file}: no model weights (a 'model' entry holding a state_dict)")
    out = {}
    for key, value in weights.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _build(hparams: dict[str, Any], weights: dict[str, torch.Tensor], file: Path) -> UNet:
    try:
        model = UNet(**hparams)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{file}: model_hparams {hparams} do not describe a unetdist UNet ({exc})") from exc
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ModelFileError(f"{file}: the weights do not fit UNet({hparams}): another architecture? "
                             f"({str(exc).splitlines()[-1].strip()})") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} weights, e.g. {result.missing_keys[:3]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected weights, e.g. {result.unexpected_keys[:3]}")
    if problems:
        raise ModelFileError(f"{file}: the weights are not those of UNet({hparams}): another architecture? "
                             + "; ".join(problems))
    return model.eval()


def _normalization(state: dict[str, Any], file: Path, channels: int) -> Normalization:
    """The transform the model was trained with (`unetdist.data.normalize`), checked against the model."""
    raw = (state.get("data") or {}).get("stats")
    if raw is None:
        raise ModelFileError(f"{file}: no normalisation statistics (data.stats); the model cannot be fed images "
                             "the way it was trained")
    try:
        stats = IntensityStats.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{file}: data.stats is malformed ({exc!r})") from exc
    if len(stats.low) != channels:
        raise ModelFileError(f"{file}: data.stats has {len(stats.low)} channel(s) but the model takes {channels}")
    try:
        return Normalization.from_dict((state.get("data") or {}).get("normalization"), stats)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{file}: data.normalization is malformed ({exc})") from exc
