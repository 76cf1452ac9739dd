"""The one owner of checkpoint files: layout, atomic commit, keep-last-k, discovery, safe reading, model files.

Layout, in `run.dir/checkpoints/`: a DDP checkpoint is one file `step_XXXXXXXXX.pt`; a DeepSpeed
checkpoint is a folder `step_XXXXXXXXX/` in DeepSpeed's own format (one shard per rank) plus a
`latest` file. Either exists under its final name only once it is complete: it is written under
a `.tmp` name, flushed and renamed, so a crash mid-write leaves a `.tmp` that discovery ignores
(and the next save removes), never a half-written checkpoint that looks complete.

Engines produce and consume the state (`state_dict`/`load_state_dict`, or for DeepSpeed its own
sharded `save_to`/`load_from` a folder); this module does everything with files.

Nothing here runs code from a file: every `torch.load` is `weights_only=True`. DeepSpeed's files
need four of DeepSpeed's plain classes, which are allow-listed; a DeepSpeed folder is verified
file by file this way before DeepSpeed's own loader (which unpickles in full) may read it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from unetdist.config import UserError

log = logging.getLogger(__name__)

MODEL_FORMAT = "unetdist-model-v1"
_NAME = re.compile(r"^step_(\d{9})(\.pt)?$")


class CheckpointError(UserError, ValueError):
    """A checkpoint or model file that cannot be used; the message names the file and the reason."""


# ---------------------------------------------------------------- layout and writing


def checkpoint_path(directory: Path, step: int, folder: bool = False) -> Path:
    """Where the checkpoint of `step` lives: a file for DDP, a folder for DeepSpeed."""
    return directory / (f"step_{step:09d}" if folder else f"step_{step:09d}.pt")


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (files or DeepSpeed folders) in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` atomically as the checkpoint file of `step`, then prune to the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory)
    final = checkpoint_path(directory, step)
    _save_atomically(state, final)
    prune(directory, keep_last)
    return final


def save_folder(directory: Path, step: int, write: Callable[[Path], None], is_main: bool,
                barrier: Callable[[], None], keep_last: int) -> Path:
    """Collective: every rank's `write(tmp_folder)` fills `step_N.tmp`; rank 0 commits it and `latest`."""
    final = checkpoint_path(directory, step, folder=True)
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale(directory)
    barrier()
    write(final.with_name(final.name + ".tmp"))
    barrier()
    if is_main:
        commit(final.with_name(final.name + ".tmp"), final)
        latest_tmp = directory / "latest.tmp"
        latest_tmp.write_text(final.name)
        commit(latest_tmp, directory / "latest")
        prune(directory, keep_last)
    barrier()
    return final


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written file or folder visible under its final name, atomically."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def remove_stale(directory: Path) -> None:
    """Delete what an interrupted save left behind under temporary names."""
    for stale in directory.glob("*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def prune(directory: Path, keep_last: int) -> None:
    for _, old in list_checkpoints(directory)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------- safe reading


@contextmanager
def _deepspeed_globals(needed: bool) -> Iterator[None]:
    """Allow the plain DeepSpeed classes its optimizer-state files pickle (loss scaler, ZeRO stage enum, ...)."""
    if not needed:
        yield
        return
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        yield


def load_checkpoint(path: Path, deepspeed: bool = False) -> Any:
    """`torch.load(weights_only=True)`: a checkpoint is data, never code to execute.

    Raises:
        CheckpointError: empty, truncated, not a torch file, or it asks for code (names what it asks for).
    """
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    try:
        with _deepspeed_globals(deepspeed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # zip, pickle and torch errors differ by version: name the file either way
        raise CheckpointError(f"{path} cannot be loaded safely: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "Weights only load failed" in text or "Unsupported global" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
        what = found.group(1) if found else "an object that is not plain data"
        return (f"it asks to run or build {what}, which a unetdist checkpoint never holds; "
                "unetdist does not execute code from files (re-create the file from a trusted source)")
    return text.splitlines()[0] if text else type(exc).__name__


def _state_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        raise CheckpointError(f"{folder}: not a DeepSpeed checkpoint folder (no *model_states.pt inside)")
    return files


def verify_folder(folder: Path) -> Any:
    """Every file of a DeepSpeed folder loads as plain data, so DeepSpeed's full unpickling runs no code.

    Returns the content of the first model-states file (every rank's holds the trainer's client state).
    """
    first = None
    for file in _state_files(folder):
        content = load_checkpoint(file, deepspeed=True)
        if first is None and file.name.endswith("model_states.pt"):
            first = content
    return first


def read_client_state(path: Path) -> dict[str, Any]:
    """The state saved by the trainer (step, config, fingerprint, ...), after checking the checkpoint reads.

    A file is read in full (weights included); a DeepSpeed folder is verified file by file and
    its first model-states file (every rank's holds the client state) is returned.
    """
    if path.is_dir():
        state = verify_folder(path)
    else:
        state = load_checkpoint(path)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a unetdist training checkpoint (no 'step' entry)")
    return state


def select_resume(resume: str, directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run starts from and its client state, or None to start afresh.

    `auto`/`force`: the newest readable checkpoint in `directory`; a damaged newest one (truncated,
    empty) is reported and the previous one used; failing only when none reads. `never`: None.
    Anything else is an explicit path, which must read.
    """
    if resume == "never":
        return None
    if resume not in ("auto", "force"):
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"run.resume={resume!r}: no such checkpoint (use auto, force, never, or a path)")
        return path, read_client_state(path)
    found = list_checkpoints(directory)
    problems = []
    for _, path in reversed(found):
        try:
            state = read_client_state(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        if problems:
            log.warning("resuming from %s instead of the %d newer checkpoint(s) that cannot be read", path, len(problems))
        return path, state
    if problems:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {directory} can be read ({problems[0]}); "
                              "move them away to start afresh, or set run.resume=never")
    return None


# ---------------------------------------------------------------- training: engines do the state, this module the files


def save_training(engine: Any, directory: Path, step: int, client_state: dict[str, Any], keep_last: int,
                  is_main: bool, barrier: Callable[[], None]) -> Path:
    """Collective: a DeepSpeed engine writes its sharded folder, otherwise rank 0 writes one file."""
    if hasattr(engine, "save_to"):
        return save_folder(directory, step, lambda tmp: engine.save_to(tmp, client_state), is_main, barrier, keep_last)
    path = checkpoint_path(directory, step)
    if is_main:
        save_checkpoint(directory, step, {**engine.state_dict(), **client_state}, keep_last)
    return path


def load_training(engine: Any, path: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore `engine` from `path` (a folder only for DeepSpeed, a file only for DDP); returns the client state.

    `state` is the already-read content of a file checkpoint (saves reading it twice).
    """
    if hasattr(engine, "load_from"):
        if not path.is_dir():
            raise CheckpointError(f"{path} is a DDP checkpoint file; set parallel.backend=ddp to resume it")
        verify_folder(path)
        return engine.load_from(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint folder; set parallel.backend=deepspeed to resume "
                              "it (or `unetdist export` it to a model file)")
    state = state if state is not None else load_checkpoint(path)
    engine.load_state_dict(state)
    return state


# ---------------------------------------------------------------- inference: any checkpoint -> weights; the model file


def find_checkpoints(path: Path) -> list[Path]:
    """A checkpoint file or DeepSpeed folder itself; for a run folder or its checkpoints/, all, newest first."""
    if path.is_file() or (path.is_dir() and any(path.glob("*model_states.pt"))):
        return [path]
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return [p for _, p in reversed(found)]
    raise FileNotFoundError(f"{path}: no checkpoint here (expected a step_*.pt file, a DeepSpeed step_* folder, "
                            "or a run folder holding checkpoints/)")


def read_newest(path: Path) -> tuple[dict[str, Any], Path, str]:
    """(state, checkpoint read, kind) as `read_weights`; for a run folder the newest that reads (see select_resume)."""
    found = find_checkpoints(path)
    problems = []
    for candidate in found:
        try:
            state, kind = read_weights(candidate)
        except CheckpointError as exc:
            if len(found) == 1:
                raise
            problems.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        return state, candidate, kind
    raise CheckpointError(f"none of the {len(found)} checkpoints in {path} can be read ({problems[0]})")


def read_weights(path: Path) -> tuple[dict[str, Any], str]:
    """(state with fp32 `model` weights and the saved plain entries, kind) for a file or a DeepSpeed folder.

    kind: ``model-file``, ``ddp-checkpoint`` or ``deepspeed-checkpoint``. ZeRO 1-3 weights are
    stitched back from the per-rank shards with DeepSpeed's zero_to_fp32 logic (after the folder
    has been verified as plain data).
    """
    if path.is_file():
        state = load_checkpoint(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a unetdist checkpoint or model file")
        return state, "model-file" if state.get("format") == MODEL_FORMAT else "ddp-checkpoint"
    client = read_client_state(path)  # verifies every file of the folder
    stage = int(client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        weights = dict(client["module"])
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    keep = ("step", "world_size", "config", "model_hparams", "data", "fingerprint")
    return {**{k: client[k] for k in keep if k in client}, "model": weights}, "deepspeed-checkpoint"


def model_file_state(weights: dict[str, torch.Tensor], hparams: dict[str, Any], data: dict[str, Any],
                     config: dict[str, Any] | None = None, step: int | None = None) -> dict[str, Any]:
    """The dict a model file holds (format ``unetdist-model-v1``); plain values, loadable with weights_only.

    `model` (state_dict, CPU), `model_hparams` (``UNet(**model_hparams)``), `data` (channels, classes,
    normalisation), and optionally `config` (the training run's) and `step`.
    """
    state: dict[str, Any] = {"format": MODEL_FORMAT,
                             "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},
                             "model_hparams": dict(hparams), "data": dict(data)}
    if config is not None:
        state["config"] = config
    if step is not None:
        state["step"] = int(step)
    return state


def write_model_file(out: Path, state: dict[str, Any]) -> None:
    """The one writer of model files: atomically, so a reader never sees half a file."""
    if state.get("format") != MODEL_FORMAT:
        raise ValueError(f"not a {MODEL_FORMAT} state (build it with model_file_state)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(state, out)


def _save_atomically(state: dict[str, Any], final: Path) -> None:
    """torch.save to `final.tmp`, fsync, then rename over `final` (see `commit`)."""
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    commit(tmp, final)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
