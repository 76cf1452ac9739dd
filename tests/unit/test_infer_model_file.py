"""Model files: DDP checkpoints, run folders, DeepSpeed folders, exported files; errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unetdist.data.errors import DataError
from unetdist.infer.io import probe_layout, read_frames
from unetdist.infer.model_file import FORMAT, ModelFileError, load_model_file, model_file_state
from unetdist.model import UNet

STATS = {"low": [10.0], "high": [1000.0], "clipped_mean": [300.0], "clipped_std": [200.0]}
HPARAMS = dict(in_channels=1, num_classes=3, base_width=4, depth=2, bilinear=False, norm="batch")


def _model(seed: int = 0, **overrides: object) -> UNet:
    torch.manual_seed(seed)
    return UNet(**{**HPARAMS, **overrides})


def _ddp_checkpoint(model: UNet, step: int) -> dict:
    """What the trainer saves (optimizer and RNG states omitted: loading must not need them)."""
    return {"model": model.state_dict(), "model_hparams": dict(model.hparams), "config": {"run": {"dir": "x"}},
            "data": {"root": "d", "channels": 1, "num_classes": 3, "stats": STATS}, "step": step, "world_size": 2}


def _same_weights(a: UNet, b: UNet) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_ddp_checkpoint_and_run_folder_newest(tmp_path: Path) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    old, new = _model(1), _model(2)
    torch.save(_ddp_checkpoint(old, 100), ckpts / "step_000000100.pt")
    torch.save(_ddp_checkpoint(new, 200), ckpts / "step_000000200.pt")
    (ckpts / "step_000000300.pt.tmp").write_bytes(b"half-written")
    model, stats, info = load_model_file(ckpts / "step_000000100.pt")
    assert _same_weights(model, old) and info.kind == "ddp-checkpoint" and info.step == 100
    for where in (tmp_path / "run", ckpts):
        model, stats, info = load_model_file(where)
        assert _same_weights(model, new) and info.step == 200 and info.path.name == "step_000000200.pt"
    assert stats.mode == "dataset" and stats.stats.low == (10.0,) and stats.stats.clipped_std == (200.0,)
    assert not model.training and model.hparams == HPARAMS


def test_exported_model_file_round_trip(tmp_path: Path) -> None:
    original = _model(3)
    state = model_file_state(original, STATS, data={"dataset": "synth"}, step=7)
    assert state["format"] == FORMAT and set(state) == {"format", "model", "model_hparams", "data", "step"}
    torch.save(state, tmp_path / "model.pt")
    model, stats, info = load_model_file(tmp_path / "model.pt")
    assert _same_weights(model, original) and info.kind == "model-file" and info.step == 7
    assert info.data["dataset"] == "synth" and info.num_classes == 3 and stats.stats.high == (1000.0,)


def test_deepspeed_stage0_folder_layout(tmp_path: Path) -> None:
    """The layout DeepSpeed writes at ZeRO stage 0 (rank 0's model states with our client state beside them)."""
    original = _model(4)
    folder = tmp_path / "checkpoints" / "step_000000010"
    folder.mkdir(parents=True)
    state = {"module": original.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}, "step": 10,
             "model_hparams": dict(original.hparams), "data": {"stats": STATS}}
    torch.save(state, folder / "mp_rank_00_model_states.pt")
    (tmp_path / "checkpoints" / "latest").write_text("step_000000010")
    for where in (folder, tmp_path):
        model, _, info = load_model_file(where)
        assert _same_weights(model, original) and info.kind == "deepspeed-checkpoint" and info.step == 10
        assert info.path == folder


def test_compiled_or_wrapped_key_prefixes_are_stripped(tmp_path: Path) -> None:
    original = _model(5)
    state = _ddp_checkpoint(original, 3)
    state["model"] = {f"module._orig_mod.{k}": v for k, v in original.state_dict().items()}
    torch.save(state, tmp_path / "wrapped.pt")
    assert _same_weights(load_model_file(tmp_path / "wrapped.pt")[0], original)


@pytest.mark.parametrize("case", ["other_architecture", "other_widths", "no_hparams", "no_stats", "garbage",
                                  "empty_folder", "stats_channels"])
def test_unusable_model_files_name_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.pt"
    good = _ddp_checkpoint(_model(), 1)
    if case == "other_architecture":
        other = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
        torch.save({**good, "model": other.state_dict()}, path)
    elif case == "other_widths":
        torch.save({**good, "model": _model(base_width=8).state_dict()}, path)
    elif case == "no_hparams":
        torch.save({k: v for k, v in good.items() if k != "model_hparams"}, path)
    elif case == "no_stats":
        torch.save({**good, "data": {"root": "d"}}, path)
    elif case == "stats_channels":
        torch.save({**good, "data": {"stats": {k: v * 2 for k, v in STATS.items()}}}, path)
    elif case == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    else:
        path = tmp_path / "empty"
        path.mkdir()
    with pytest.raises(ModelFileError, match=str(path)):
        load_model_file(path)


def test_missing_model_path() -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_file("/nowhere/model.pt")


def test_channel_mismatch_and_unreadable_input_name_the_file(tmp_path: Path) -> None:
    rgb = tmp_path / "rgb.png"
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match=r"rgb.png.*3 channel\(s\) but the model takes 1"):
        probe_layout(rgb, 1)
    assert probe_layout(rgb, 3).channels == 3
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="broken.tif"):
        probe_layout(broken, 1)
    with pytest.raises(FileNotFoundError, match="absent.tif"):
        probe_layout(tmp_path / "absent.tif", 1)


@pytest.mark.parametrize(
    ("shape", "in_channels", "suffix", "axes", "frames", "stack"),
    [
        ((30, 40), 1, ".tif", "YX", 1, False),
        ((5, 30, 40), 1, ".tif", "TYX", 5, True),  # plain multi-page TIFF: frames
        ((5, 30, 40), 1, ".npy", "TYX", 5, True),  # 3-D array for a 1-channel model: a stack
        ((3, 30, 40), 3, ".npy", "CYX", 1, False),
        ((3, 30, 40), 3, ".tif", "CYX", 1, False),  # 3 pages for a 3-channel model: one image
        ((30, 40, 3), 3, ".npy", "YXC", 1, False),
        ((4, 2, 30, 40), 2, ".tif", "TCYX", 4, True),
    ],
)
def test_geometry_rule(tmp_path: Path, shape: tuple, in_channels: int, suffix: str, axes: str, frames: int,
                       stack: bool) -> None:
    path = tmp_path / f"image{suffix}"
    array = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    if suffix == ".npy":
        np.save(path, array)
    elif len(shape) == 4:
        tifffile.imwrite(path, array, imagej=True, metadata={"axes": axes})
    else:
        tifffile.imwrite(path, array, photometric="minisblack")  # pages, not RGB
    layout = probe_layout(path, in_channels)
    assert (layout.axes, layout.frames, layout.channels, layout.height, layout.width, layout.stack) == \
        (axes, frames, in_channels, 30, 40, stack)
    assert read_frames(path, layout).shape == (frames, in_channels, 30, 40)
