"""Users' folders: images paired with masks by name, re-sharding that never loses a dataset, checked settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from unetdist.cli import main as cli
from unetdist.config import ShardConfig
from unetdist.data.errors import DataError
from unetdist.data.inputs import pair_by_name, read_pairs
from unetdist.data.shards import write_shards
from unetdist.infer.__main__ import main as infer_cli


def _pair(folder: Path, name: str, mask_name: str, seed: int, size: tuple[int, int] = (40, 48)) -> None:
    """A uint16 image and its mask (`mask_name` relative to `folder`), TIFF, with content telling pairs apart."""
    rng = np.random.default_rng(seed)
    mask = (rng.random(size) < 0.3 + 0.1 * seed).astype(np.uint8)
    for path in (folder / name, folder / mask_name):
        path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / name, mask.astype(np.uint16) * 1000 + rng.integers(0, 200, size, dtype=np.uint16))
    tifffile.imwrite(folder / mask_name, mask)


def test_masks_pair_by_name_never_by_sorted_position(tmp_path: Path) -> None:
    d = tmp_path / "cellpose"
    _pair(d, "x1.tif", "x1_masks.tif", 0)
    _pair(d, "x1_2.tif", "x1_2_masks.tif", 1)  # sorted: x1.tif, x1_2.tif but x1_2_masks.tif, x1_masks.tif
    pairs = read_pairs(str(d / "*.tif"), str(d / "*_masks.tif"))
    assert [(i.name, m.name) for i, m in pairs] == [("x1.tif", "x1_masks.tif"), ("x1_2.tif", "x1_2_masks.tif")]
    _pair(tmp_path, "fov/a.tif", "masks/a.tif", 2)  # identical names in two folders
    pairs = read_pairs(str(tmp_path / "fov" / "*.tif"), str(tmp_path / "masks" / "*.tif"))
    assert [(i.parent.name, m.parent.name) for i, m in pairs] == [("fov", "masks")]
    _pair(tmp_path / "img", "img_b.tif", "lbl_b.tif", 3)
    pairs = read_pairs(str(tmp_path / "img" / "img_*.tif"), str(tmp_path / "img" / "lbl_*.tif"))
    assert [(i.name, m.name) for i, m in pairs] == [("img_b.tif", "lbl_b.tif")]
    (d / "x3.tif").write_bytes(b"")
    (d / "x4_masks.tif").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 image\(s\) without their label: .*x3.tif; 1 label\(s\) without their "
                                        r"image: .*x4_masks.tif"):
        read_pairs(str(d / "*.tif"), str(d / "*_masks.tif"))
    with pytest.raises(DataError, match="images with the same name: a/x.tif, b/x.png"):
        pair_by_name([Path("a/x.tif"), Path("b/x.png")], [Path("m/x.tif")])
    rc = cli(["shard", "--images", str(d / "*.tif"), "--labels", str(d / "*_masks.tif"), "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o" / "manifest.json").exists()


def test_evaluate_pairs_predictions_and_images_with_labels_by_name(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "data"
    _pair(d, "x1.tif", "x1_masks.tif", 0)
    _pair(d, "x1_2.tif", "x1_2_masks.tif", 1)
    (tmp_path / "pred").mkdir()
    for stem in ("x1", "x1_2"):  # perfect predictions, named as `unetdist predict` names them
        tifffile.imwrite(tmp_path / "pred" / f"{stem}_labels.tif", tifffile.imread(d / f"{stem}_masks.tif"))
    out = tmp_path / "eval"
    assert infer_cli(["evaluate", "--pred", str(tmp_path / "pred" / "*_labels.tif"), "--labels",
                      str(d / "*_masks.tif"), "--images", str(d / "*.tif"), "--overlays", "0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pooled"]["dice"]["foreground"] == 1.0  # by sorted position it would be ~0.4
    (d / "x1_masks.tif").rename(d / "x9_masks.tif")
    assert infer_cli(["evaluate", "--pred", str(tmp_path / "pred" / "*_labels.tif"), "--labels",
                      str(d / "*_masks.tif"), "--out", str(out)]) == 2
    assert "1 prediction(s) without their label: " in capsys.readouterr().err


def test_resharding_with_a_damaged_image_keeps_the_old_dataset(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "dataset"
    for i in range(3):
        _pair(raw, f"im{i}.tif", f"im{i}_masks.tif", i, (64, 64))
    shard = ShardConfig(tile=32, val_fraction=0.34)
    write_shards(read_pairs(str(raw / "im?.tif"), str(raw / "*_masks.tif")), out, shard, num_classes=2)
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a good header, the pixel data cut short: found only when the pixels are read, after the shards began
    (raw / "im1.tif").write_bytes(_cut_pixels(raw / "im1.tif"))
    with pytest.raises(DataError, match="im1.tif"):
        write_shards(read_pairs(str(raw / "im?.tif"), str(raw / "*_masks.tif")), out, shard, num_classes=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, nothing left behind


def _cut_pixels(path: Path) -> bytes:
    """The file cut inside its pixel data (header and IFD, written first by tifffile, intact)."""
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = path.read_bytes()
    assert offset + count <= len(data)
    return data[: offset + count // 10]


@pytest.mark.parametrize("flags, message", [
    (["--val-fraction", "1.5"], "--val-fraction=1.5 must be in (0, 1)"),
    (["--tile", "3"], "--tile=3 must be >= 8"),
    (["--shard-bytes", "0"], "--shard-bytes=0 must be >= 1"),
    (["--empty-keep", "-1"], "--empty-keep=-1.0 must be in [0, 1]"),
    (["--min-foreground", "0.9", "--empty-keep", "0"], "no training tiles: all"),
])
def test_shard_settings_are_checked_like_the_config(tmp_path: Path, flags: list[str], message: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    for i in range(2):
        _pair(tmp_path / "raw", f"im{i}.tif", f"im{i}_masks.tif", i, (32, 32))
    rc = cli(["shard", "--images", str(tmp_path / "raw" / "im?.tif"), "--labels", str(tmp_path / "raw" / "*_masks.tif"),
              "--out", str(tmp_path / "out"), "--tile", "16", *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("unetdist shard:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err  # one line (progress lines aside)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_tile_larger_than_the_images_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(2):
        _pair(tmp_path / "raw", f"im{i}.tif", f"im{i}_masks.tif", i, (24, 40))
    with caplog.at_level(logging.WARNING):
        write_shards(read_pairs(str(tmp_path / "raw" / "im?.tif"), str(tmp_path / "raw" / "*_masks.tif")),
                     tmp_path / "out", ShardConfig(tile=32), num_classes=2)
    assert any("smaller than the 32 px tile" in r.getMessage() and "im0.tif (24 x 40)" in r.getMessage()
               for r in caplog.records)


def test_one_image_and_one_label_pair_whatever_their_names(tmp_path: Path) -> None:
    from unetdist.data.inputs import pair_files

    image, label = tmp_path / "img_0000.tif", tmp_path / "lbl_0000.tif"
    assert pair_files([image], [label]) == [(image, label)]
    with pytest.raises(DataError, match="without their label"):  # two of each: names must decide
        pair_files([image, tmp_path / "img_0001.tif"], [label, tmp_path / "lbl_0001.tif"])
