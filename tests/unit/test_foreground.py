"""Low-resolution foreground masks: from a pyramid level or a strided read, and skipping background in shard."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tifffile

from unetdist.config import ShardConfig
from unetdist.data.foreground import foreground_mask
from unetdist.data.inputs import Pair
from unetdist.data.readers import open_image
from unetdist.data.shards import write_shards


def _slide(height: int, width: int, tissue_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dim glass (100) below `tissue_rows`, tissue (1000) above it with bright nuclei (3000) labelled 1."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 5, (height, width))
    image[:tissue_rows] = rng.normal(1000, 50, (tissue_rows, width))
    label = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(12):
        cy, cx = rng.integers(10, tissue_rows - 10), rng.integers(10, width - 10)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        image[disk], label[disk] = 3000, 1
    return np.clip(image, 0, 65535).astype(np.uint16), label


@pytest.mark.parametrize("pyramid", [True, False])
def test_mask_from_a_pyramid_level_or_a_strided_read(tmp_path, pyramid):
    image, _ = _slide(1024, 768, tissue_rows=300)
    image[600:700, 500:600] = 2000  # an island of tissue in the glass
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(128, 128), compression="zlib", subifds=2 if pyramid else 0, metadata={"axes": "YX"})
        if pyramid:
            for step in (2, 4):
                tif.write(image[::step, ::step], tile=(128, 128), subfiletype=1, compression="zlib")
    with open_image(path) as source:
        mask = foreground_mask(source, max_pixels=256 * 192 if pyramid else 40_000)
    assert mask.scale_y == mask.scale_x == (4.0 if pyramid else 5.0)  # level 2, or every 5th pixel
    assert mask.covers(0, 64, 0, 64) and mask.covers(620, 680, 520, 580)
    assert not mask.covers(400, 560, 0, 768) and not mask.covers(720, 1024, 0, 768)
    assert not mask.covers(600, 700, 0, 400)
    with open_image(path) as source:
        dark = foreground_mask(source, polarity="dark", max_pixels=40_000)
    assert dark.covers(720, 1024, 0, 768) and not dark.covers(0, 64, 0, 64)


def test_shard_skips_background_tiles_without_reading_them(tmp_path):
    pairs = []
    for i, split in enumerate(("train", "val")):
        image, label = _slide(512, 256, tissue_rows=250, seed=i)
        tifffile.imwrite(tmp_path / f"img{i}.tif", image, tile=(64, 64), compression="zlib")
        tifffile.imwrite(tmp_path / f"lbl{i}.tif", label)
        pairs.append(Pair(tmp_path / f"img{i}.tif", tmp_path / f"lbl{i}.tif", split))
    cfg = ShardConfig(tile=64, region_pixels=65536, seed=0)
    every = write_shards(pairs, tmp_path / "every", cfg, num_classes=2)
    tissue = write_shards(pairs, tmp_path / "tissue", replace(cfg, skip_background="bright"), num_classes=2)
    assert every["train"]["samples"] == 32 and tissue["train"]["samples"] == 16  # the 4 tile rows over tissue
    assert tissue["train"]["rejected_empty"] == 16 and tissue["val"]["samples"] == 32  # validation keeps all
    assert tissue["train"]["class_pixels"] == every["train"]["class_pixels"]  # labels are still counted
    # the glass band (rows 256-512, about 100) was not read: only the tissue band is in the statistics
    assert every["stats"]["mean"][0] < 700 and tissue["stats"]["mean"][0] > 900
    with pytest.raises(ValueError, match="skip_background"):
        from unetdist.config import Config, validate

        config = Config()
        config.data.shard.skip_background = "glass"
        validate(config)
