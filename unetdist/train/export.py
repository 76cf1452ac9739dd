"""`unetdist export`: any training checkpoint -> one plain model file for inference.

A DDP checkpoint is one file; a DeepSpeed checkpoint is a folder of per-rank shards whose
weights, under ZeRO-3, exist only as partitions: the checkpoint module stitches them back
together offline (no process group, any number of ranks at save time). The model file format
is described by `unetdist.train.checkpoint.model_file_state`.
"""

from __future__ import annotations

from pathlib import Path

from unetdist.train.checkpoint import CheckpointError, model_file_state, read_newest, write_model_file


def export_model(src: Path, out: Path) -> Path:
    """Write the model file for the checkpoint `src` names; returns the checkpoint used."""
    state, checkpoint, _ = read_newest(src)
    if "model_hparams" not in state:
        raise CheckpointError(f"{checkpoint} was not written by unetdist (no model_hparams)")
    write_model_file(out, model_file_state(state["model"], state["model_hparams"], state.get("data", {}),
                                           state.get("config", {}), int(state.get("step", 0))))
    return checkpoint
