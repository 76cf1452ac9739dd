"""`unetdist export`: any training checkpoint -> one plain model file for inference.

A DDP checkpoint is one file; a DeepSpeed checkpoint is a folder of per-rank shards whose
weights, under ZeRO-3, exist only as partitions: DeepSpeed's zero_to_fp32 logic stitches them
back together offline (no process group, any number of ranks at save time).

The model file (format "unetdist-model-v1") is a dict of plain values, loadable with
`torch.load(weights_only=True)`: `model` (state_dict, fp32), `model_hparams` (UNet keyword
arguments), `data` (the training data's channels, classes and normalisation statistics),
`config` (the training run's resolved config) and `step`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unetdist.train.checkpoint import list_checkpoints, load_checkpoint

MODEL_FORMAT = "unetdist-model-v1"


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file or DeepSpeed folder; a run folder or its checkpoints/ folder means the newest."""
    if path.is_file() or (path.is_dir() and any(path.glob("*model_states.pt"))):
        return path
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return found[-1][1]
    raise FileNotFoundError(f"{path}: no checkpoint here (expected a step_*.pt file, a DeepSpeed step_* folder, "
                            "or a run folder holding checkpoints/)")


def read_training_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 model state_dict, client state) from a DDP file or a DeepSpeed folder at any ZeRO stage."""
    if path.is_file():
        state = load_checkpoint(path)
        return state["model"], state
    files = sorted(path.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{path}: not a DeepSpeed checkpoint folder (no *model_states.pt inside)")
    # DeepSpeed's own files hold objects beyond plain tensors (its config, parameter shapes); they were
    # written by this run's ranks, not downloaded, so they are loaded in full here.
    client = torch.load(files[0], map_location="cpu", weights_only=False)
    stage = int(client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        weights = {k: v.float() if v.is_floating_point() else v for k, v in client["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    keep = ("step", "world_size", "config", "model_hparams", "data")
    return dict(weights), {k: client[k] for k in keep if k in client}


def export_model(src: Path, out: Path) -> Path:
    """Write the model file for the checkpoint `src` names; returns the checkpoint used."""
    checkpoint = find_checkpoint(src)
    weights, state = read_training_checkpoint(checkpoint)
    if "model_hparams" not in state:
        raise ValueError(f"{checkpoint} was not written by unetdist (no model_hparams)")
    model = {
        "format": MODEL_FORMAT,
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        "model_hparams": dict(state["model_hparams"]),
        "data": state.get("data", {}),
        "config": state.get("config", {}),
        "step": int(state.get("step", 0)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(model, tmp)
    tmp.replace(out)
    return checkpoint
