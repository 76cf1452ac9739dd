"""Every kind of input gives outputs of its own geometry, through the real file-to-file prediction path."""

from __future__ import annotations


import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from unetdist.parallel.env import DistEnv
from unetdist.infer.model_file import model_file_state
from unetdist.infer.predict import PredictOptions
from unetdist.infer.run import predict_files
from unetdist.infer.store import OutputSpec
from unetdist.model import UNet

ALONE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _model_file(path: Path, in_channels: int, num_classes: int = 3) -> Path:
    torch.manual_seed(0)
    model = UNet(in_channels=in_channels, num_classes=num_classes, base_width=4, depth=2)
    stats = {"low": [0.0] * in_channels, "high": [60000.0] * in_channels,
             "clipped_mean": [1000.0] * in_channels, "clipped_std": [500.0] * in_channels}
    torch.save(model_file_state(model, stats), path)
    return path


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, shape).astype(np.uint16)


@pytest.fixture(scope="module")
def one_channel_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_file(tmp_path_factory.mktemp("m") / "model.pt", 1)


def _predict(model: Path, inputs: list[Path], out: Path, **kwargs: object) -> dict:
    options = PredictOptions(tile=32, overlap=8, batch_size=3)
    outputs = OutputSpec(probabilities=True, prob_dtype="float32", instances=True, chunk=32)
    return predict_files(model, [str(p) for p in inputs], out, options, outputs, ALONE, **kwargs)


def test_odd_small_tiny_sizes_and_formats(tmp_path: Path, one_channel_model: Path) -> None:
    images = {
        "odd.tif": (_noise((37, 53)), (37, 53)),
        "small.npy": (_noise((20, 24)), (20, 24)),  # smaller than a tile
        "tiny.tif": (_noise((3, 5)), (3, 5)),  # smaller than the model's minimum input (4 px): padded
        "wide.png": (_noise((40, 101)), (40, 101)),  # 16-bit PNG
    }
    paths = []
    for name, (array, _) in images.items():
        path = tmp_path / name
        if name.endswith(".npy"):
            np.save(path, array)
        elif name.endswith(".png"):
            Image.fromarray(array).save(path)
        else:
            tifffile.imwrite(path, array)
        paths.append(path)
    out = tmp_path / "out"
    summary = _predict(one_channel_model, paths, out)
    for name, (_, shape) in images.items():
        stem = Path(name).stem
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        probs = tifffile.imread(out / f"{stem}_probs.tif")
        instances = tifffile.imread(out / f"{stem}_instances.tif")
        assert labels.shape == shape and labels.dtype == np.uint8 and labels.max() < 3
        assert probs.shape == (3, *shape) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        assert np.array_equal(probs.argmax(0), labels)
        assert instances.shape == shape and instances.dtype == np.uint16
    assert sorted(summary["written"]) == sorted(str(p) for p in out.glob("*.tif"))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*")), "no temporary files or work folders left"
    saved = json.loads((out / "predict.json").read_text())
    assert saved["megapixels"] == pytest.approx(sum(np.prod(s) for _, s in images.values()) / 1e6)
    assert saved["options"]["margin"] == 2 and saved["megapixels_per_s"] > 0


def test_stacks_keep_their_frames(tmp_path: Path, one_channel_model: Path) -> None:
    stack = _noise((4, 30, 45))
    tifffile.imwrite(tmp_path / "timelapse.tif", stack, photometric="minisblack")
    np.save(tmp_path / "zstack.npy", stack[:3])
    out = tmp_path / "out"
    _predict(one_channel_model, [tmp_path / "timelapse.tif", tmp_path / "zstack.npy"], out)
    assert tifffile.imread(out / "timelapse_labels.tif").shape == (4, 30, 45)
    assert tifffile.imread(out / "timelapse_probs.tif").shape == (4, 3, 30, 45)
    assert tifffile.imread(out / "timelapse_instances.tif").shape == (4, 30, 45)
    assert tifffile.imread(out / "zstack_labels.tif").shape == (3, 30, 45)
    # frame by frame: frame 2 of the stack is predicted as if it were alone
    tifffile.imwrite(tmp_path / "frame2.tif", stack[2])
    _predict(one_channel_model, [tmp_path / "frame2.tif"], tmp_path / "single")
    assert np.array_equal(tifffile.imread(out / "timelapse_labels.tif")[2],
                          tifffile.imread(tmp_path / "single" / "frame2_labels.tif"))


def test_multichannel_inputs(tmp_path: Path) -> None:
    model = _model_file(tmp_path / "rgb_model.pt", 3, num_classes=2)
    rgb = _noise((33, 47, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    np.save(tmp_path / "chw.npy", np.moveaxis(rgb, -1, 0))
    tifffile.imwrite(tmp_path / "series.tif", _noise((2, 3, 33, 47)), imagej=True, metadata={"axes": "TCYX"})
    out = tmp_path / "out"
    _predict(model, [tmp_path / "photo.png", tmp_path / "chw.npy", tmp_path / "series.tif"], out)
    assert tifffile.imread(out / "photo_labels.tif").shape == (33, 47)
    assert np.array_equal(tifffile.imread(out / "photo_labels.tif"), tifffile.imread(out / "chw_labels.tif"))
    assert tifffile.imread(out / "series_labels.tif").shape == (2, 33, 47)


def test_same_stem_twice_is_an_error(tmp_path: Path, one_channel_model: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        tifffile.imwrite(tmp_path / folder / "img.tif", _noise((20, 20)))
    with pytest.raises(ValueError, match="would both write img_labels"):
        _predict(one_channel_model, [tmp_path / "a" / "img.tif", tmp_path / "b" / "img.tif"], tmp_path / "out")
