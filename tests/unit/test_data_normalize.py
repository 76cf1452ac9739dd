"""Per-image percentile normalisation: one transform for shards, loader, model file and prediction."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unetdist.config import AugmentConfig, DataConfig, NormalizeConfig, ShardConfig
from unetdist.data.errors import DataError
from unetdist.data.manifest import open_manifest
from unetdist.data.normalize import (MAX_PIXELS, PERCENTILE_GRID, IntensityStats, Normalization, image_percentiles,
                                     normalize)
from unetdist.data.shards import write_shards
from unetdist.data.stream import train_loader, val_loader
from unetdist.data.synth import synth_image
from unetdist.infer.model_file import load_model_file, model_file_state
from unetdist.infer.predict import PredictOptions, SlidingWindowPredictor, warn_unusual_intensity
from unetdist.model import UNet

STATS = IntensityStats((100.0,), (3000.0,), (900.0,), (500.0,))
PERCENTILE = Normalization("percentile", STATS)


class CountingArray:
    """A lazy image: slicing reads only the region, and the pixels read are counted (as a file reader would)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.read = array, array.shape, array.dtype, 0

    def __getitem__(self, index: tuple) -> np.ndarray:
        out = np.asarray(self.array[index])
        self.read += out.size
        return out


def test_percentiles_are_numpys_for_small_images_per_channel_and_over_frames() -> None:
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 300.0, (3, 2, 50, 70)).astype(np.float32)  # T, C, Y, X
    image[:, 1] *= 10
    got = image_percentiles(image, "TCYX", (1, 50, 99.8))
    for c in range(2):
        np.testing.assert_allclose(got[c], np.percentile(image[:, c], (1, 50, 99.8)), rtol=1e-12)
    np.testing.assert_allclose(image_percentiles(image[0, 0], "YX", (2, 98)), [np.percentile(image[0, 0], (2, 98))])
    with pytest.raises(ValueError, match="axes"):
        image_percentiles(image, "CYX", (1, 99))


def test_large_images_are_sampled_in_regions_close_to_the_exact_percentiles() -> None:
    height, width = 1500, 1700  # nuclei under uneven illumination: a sample from one side would be off
    image = (synth_image(1, 0, height, width)[0] * np.linspace(0.6, 1.4, width)[None]).astype(np.uint16)
    lazy = CountingArray(np.stack([image, image // 4]))
    got = image_percentiles(lazy, "CYX", (1, 50, 99.8), max_pixels=300_000)
    assert 300_000 * 2 <= lazy.read <= 2 * 300_000 * 2  # bounded reads (two channels), far below 2 x 2.55 M
    for channel, whole in enumerate((image, image // 4)):
        exact = np.percentile(whole, (1, 50, 99.8))
        error = np.abs(got[channel] - exact) / (exact[2] - exact[0])  # in units of the normalised range
        assert error.max() < 0.01, (got[channel], exact)
    half, exact = image_percentiles(image[:, : width // 2], "YX", (1, 50, 99.8))[0], np.percentile(image, (1, 50, 99.8))
    assert np.abs(half - exact).max() / (exact[2] - exact[0]) > 0.05  # one side alone would be off
    again = image_percentiles(CountingArray(np.stack([image, image // 4])), "CYX", (1, 50, 99.8), max_pixels=300_000)
    np.testing.assert_array_equal(got, again)  # the sample depends on the shape only


def test_percentile_mode_cancels_exposure_offset_bit_depth_and_float_scaling() -> None:
    raw = synth_image(3, 0, 96, 128)[0].astype(np.float64)  # uint16 fluorescence
    reference = normalize(raw[None], PERCENTILE, PERCENTILE.bounds(raw[None]))
    variants = {"x3": raw * 3, "+2000": raw + 2000, "float [0, 1]": raw / 65535,
                "x0.3": raw * 0.3}
    for name, image in variants.items():
        image = image.astype(np.float32)[None]
        out = normalize(image, PERCENTILE, PERCENTILE.bounds(image))
        np.testing.assert_allclose(out, reference, atol=1e-4, err_msg=name)
    dataset = Normalization("dataset", STATS)
    shifted = normalize((raw + 2000)[None].astype(np.float32), dataset)
    assert np.abs(shifted - normalize(raw[None].astype(np.float32), dataset)).max() > 1  # the old mode does not


def test_training_tiles_carry_their_whole_images_percentiles(tmp_path: Path) -> None:
    pairs = []
    for i, (gain, offset) in enumerate([(1.0, 0), (4.0, 500), (0.5, 3000), (2.0, 100)]):
        image = (synth_image(5, i, 64, 96)[0] * gain + offset).clip(0, 65535).astype(np.uint16)
        tifffile.imwrite(tmp_path / f"im{i}.tif", image)
        np.save(tmp_path / f"lb{i}.npy", (image > np.median(image)).astype(np.uint8))
        pairs.append((tmp_path / f"im{i}.tif", tmp_path / f"lb{i}.npy"))
    out = tmp_path / "shards"
    write_shards(pairs, out, ShardConfig(tile=32, val_fraction=0.5, seed=2), num_classes=2)
    manifest = open_manifest(out)
    assert manifest.image_percentiles == PERCENTILE_GRID
    images = {str(p[0]): tifffile.imread(p[0]) for p in pairs}
    data = DataConfig(batch_size=4, workers=0, shuffle_buffer=0, augment=AugmentConfig(enabled=False))
    checked = 0
    for batch in [*train_loader(data, manifest, rank=0, world_size=1, seed=0, epoch=0),
                  *val_loader(data, manifest, rank=0, world_size=1)]:
        for key, tile in zip(batch["key"], batch["image"].numpy()):
            source = pairs[int(key[1:7])][0]
            y, x = int(key.split("_y")[1][:5]), int(key.split("_x")[1][:5])
            whole = images[str(source)][None]
            expected = normalize(whole, PERCENTILE, PERCENTILE.bounds(whole))[:, y:y + 32, x:x + 32]
            np.testing.assert_allclose(tile, expected, rtol=1e-6, atol=1e-6)
            own = normalize(whole[:, y:y + 32, x:x + 32], PERCENTILE, PERCENTILE.bounds(whole[:, y:y + 32, x:x + 32]))
            assert np.abs(own - tile).max() > 1e-3  # per-tile percentiles would differ
            checked += 1
    assert checked >= manifest.val_samples
    with pytest.raises(DataError, match="1.5 are not among"):
        train_loader(DataConfig(normalize=NormalizeConfig(low=1.5)), manifest, rank=0, world_size=1, seed=0, epoch=0)


def test_stored_percentiles_are_of_the_whole_frame_even_when_it_is_read_in_bands(tmp_path: Path) -> None:
    """Sharding reads a frame band by band; the manifest's percentiles must still be the whole frame's."""
    from dataclasses import replace

    from unetdist.data.samples import frame_bands

    rng = np.random.default_rng(7)
    pairs, frames = [], []
    for i in range(2):
        image = np.empty((2, 512, 256), np.uint16)  # C x H x W: a bright top half, a dark bottom half
        image[:, :256] = rng.integers(20000, 60000, (2, 256, 256))
        image[:, 256:] = rng.integers(100, 900, (2, 256, 256))
        image[1] //= 3  # the channels differ too
        np.save(tmp_path / f"im{i}.npy", image)
        np.save(tmp_path / f"lb{i}.npy", (rng.random((512, 256)) > 0.5).astype(np.uint8))
        pairs.append((tmp_path / f"im{i}.npy", tmp_path / f"lb{i}.npy"))
        frames.append(image)
    whole_cfg = ShardConfig(tile=32, val_fraction=0.5, seed=2, workers=1)
    banded_cfg = replace(whole_cfg, region_pixels=65536)
    assert len(frame_bands(512, 256, whole_cfg)) == 1 and len(frame_bands(512, 256, banded_cfg)) >= 2
    whole = write_shards(pairs, tmp_path / "whole", whole_cfg, num_classes=2)
    banded = write_shards(pairs, tmp_path / "banded", banded_cfg, num_classes=2)
    parallel = write_shards(pairs, tmp_path / "parallel", replace(banded_cfg, workers=2), num_classes=2)
    for i, image in enumerate(frames):
        expected = image_percentiles(image, "CYX", PERCENTILE_GRID, MAX_PIXELS).tolist()
        assert banded["image_percentiles"]["images"][i] == [expected]
        top_band = image_percentiles(image[:, :128], "CYX", PERCENTILE_GRID, MAX_PIXELS).tolist()
        assert top_band != expected  # per-band percentiles would be caught
    assert banded["image_percentiles"] == whole["image_percentiles"] == parallel["image_percentiles"]
    assert open_manifest(tmp_path / "banded").raw["image_percentiles"] == whole["image_percentiles"]


def test_model_file_keeps_the_mode_and_prediction_applies_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=2, base_width=4, depth=2).eval()
    norm = Normalization("percentile", STATS, (2.0, 99.5), MAX_PIXELS)
    torch.save(model_file_state(model, norm, data={"dtype": "uint16"}), tmp_path / "model.pt")
    loaded, got, info = load_model_file(tmp_path / "model.pt")
    assert got == norm and info.data["normalization"] == norm.to_dict()
    torch.save(model_file_state(model, STATS), tmp_path / "old.pt")  # files without the entry: dataset mode
    assert load_model_file(tmp_path / "old.pt")[1] == Normalization("dataset", STATS)
    raw = synth_image(9, 0, 80, 100)[0][None].astype(np.float32)
    predictor = SlidingWindowPredictor(loaded, got, PredictOptions(tile=64, overlap=16), torch.device("cpu"))
    reference = predictor.predict(raw)
    for image in (raw * 3 + 2000, raw / 65535):
        torch.testing.assert_close(predictor.predict(image), reference, rtol=1e-3, atol=1e-3)
    with caplog.at_level(logging.WARNING):
        assert not warn_unusual_intensity(Path("good.tif"), [raw], got)
        assert warn_unusual_intensity(Path("flat.tif"), [np.full_like(raw, 7)], got)
        dataset = Normalization("dataset", IntensityStats.from_dict({"low": [float(np.percentile(raw, 0.5))],
                                                                     "high": [float(np.percentile(raw, 99.5))],
                                                                     "clipped_mean": [0.0], "clipped_std": [1.0]}))
        assert not warn_unusual_intensity(Path("same.tif"), [raw], dataset, "float32")
        assert warn_unusual_intensity(Path("offset.tif"), [raw + 2000], dataset, "float32")
        assert warn_unusual_intensity(Path("float.tif"), [raw / 65535], dataset, "float32")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 3 and warned[0].startswith("flat.tif") and warned[1].startswith("offset.tif"), warned
    assert "data.normalize.mode=percentile" in warned[1]
