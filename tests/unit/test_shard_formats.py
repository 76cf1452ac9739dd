"""Sharding microscopy formats through the lazy readers: the same tiles as in-memory arrays, in bounded bands."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from unetdist.config import ShardConfig
from unetdist.data.shards import write_shards
from unetdist.data.synth import synth_image
from unetdist.data.tiling import bands, iter_band_tiles, iter_tiles
from tests.unit.test_data_shards import all_samples

CFG = ShardConfig(tile=32, overlap=6, val_fraction=0.5, seed=3, frame_block=1)


def _everything(out: Path, manifest: dict) -> dict[str, dict]:
    return {**all_samples(out, manifest, "train"), **all_samples(out, manifest, "val")}


def _nuclei(height: int, width: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    image, instances = synth_image(seed=5, index=index, height=height, width=width)
    return image, instances.astype(np.uint16)


@pytest.mark.parametrize("height, width, overlap", [(300, 200, 6), (97, 61, 0), (40, 33, 13)])
def test_bands_give_the_same_tiles_as_the_whole_image(height, width, overlap):
    rng = np.random.default_rng(height)
    image = rng.integers(0, 65536, (2, height, width), dtype=np.uint16)
    label = rng.integers(0, 3, (height, width), dtype=np.uint8)
    whole = list(iter_tiles(image, label, 32, overlap))
    cut = []
    for band in bands(height, width, 32, overlap, region_pixels=40 * width, halo=1):
        rows = slice(band.top, band.bottom)
        cut += list(iter_band_tiles(image[:, rows], label[rows], band, height, width, 32, overlap))
    assert [(t.y, t.x, t.valid_h, t.valid_w) for t in cut] == [(t.y, t.x, t.valid_h, t.valid_w) for t in whole]
    for a, b in zip(whole, cut):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_large_image_in_small_bands_equals_one_band_with_weight_maps(tmp_path):
    pairs = []
    for i in range(2):
        image, instances = _nuclei(260, 300, i)
        tifffile.imwrite(tmp_path / f"img{i}.ome.tif", image, tile=(64, 64), compression="zlib",
                         metadata={"axes": "YX"})
        tifffile.imwrite(tmp_path / f"lbl{i}.tif", instances, compression="lzw")
        pairs.append((tmp_path / f"img{i}.ome.tif", tmp_path / f"lbl{i}.tif"))
    cfg = replace(CFG, labels="instances", weight_map=True, workers=1)
    whole = write_shards(pairs, tmp_path / "whole", cfg, num_classes=3)
    banded = write_shards(pairs, tmp_path / "banded", replace(cfg, region_pixels=65536), num_classes=3)
    parallel = write_shards(pairs, tmp_path / "parallel", replace(cfg, region_pixels=65536, workers=2),
                            num_classes=3)
    for shard in banded["train"]["shards"] + banded["val"]["shards"]:  # bands tiled by 2 processes: same bytes
        assert (tmp_path / "parallel" / shard["name"]).read_bytes() == (tmp_path / "banded" / shard["name"]).read_bytes()
    assert banded["stats"] == whole["stats"]  # exact histograms, band by band
    assert banded["train"]["class_pixels"] == whole["train"]["class_pixels"]
    a, b = _everything(tmp_path / "whole", whole), _everything(tmp_path / "banded", banded)
    assert a.keys() == b.keys() and len(a) == 2 * 10 * 12
    for key in a:
        np.testing.assert_array_equal(a[key]["img"], b[key]["img"])
        np.testing.assert_array_equal(a[key]["lbl"], b[key]["lbl"])
        np.testing.assert_allclose(a[key]["wgt"].astype(np.float32), b[key]["wgt"].astype(np.float32), atol=2e-3)


def test_ome_tiff_5d_gives_z_slices_as_frames_with_axes_and_pixel_size(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 4096, (2, 2, 3, 40, 48), dtype=np.uint16)  # T C Z Y X
    labels = rng.integers(0, 2, (2, 3, 40, 48), dtype=np.uint8)  # T Z Y X, no axes metadata
    tifffile.imwrite(tmp_path / "movie.ome.tif", data, tile=(16, 16), compression="lzw",
                     metadata={"axes": "TCZYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65, "PhysicalSizeZ": 2.0})
    tifffile.imwrite(tmp_path / "movie_labels.tif", labels, photometric="minisblack")
    pairs = [(tmp_path / "movie.ome.tif", tmp_path / "movie_labels.tif")]
    for axes in ("auto", "TCZYX"):
        out = tmp_path / axes
        manifest = write_shards(pairs, out, replace(CFG, tile=16, overlap=0, axes=axes), num_classes=2)
        entry = manifest["inputs"][0]
        assert (entry["frames"], entry["channels"], entry["axes"]) == (6, 2, "TCZYX")
        assert entry["pixel_size"] == {"X": [0.65, "micrometer"], "Y": [0.65, "micrometer"], "Z": [2.0, "micrometer"]}
        assert manifest["pixel_size"] == entry["pixel_size"]
        samples = _everything(out, manifest)
        assert len(samples) == 6 * 3 * 3
        for sample in samples.values():
            meta = sample["meta"]
            t, z = divmod(meta["frame"], 3)
            h, w = meta["valid_h"], meta["valid_w"]
            window = (slice(meta["y"], meta["y"] + h), slice(meta["x"], meta["x"] + w))
            np.testing.assert_array_equal(sample["img"][:, :h, :w], data[t, :, z][(slice(None),) + window])
            np.testing.assert_array_equal(sample["lbl"][:h, :w], labels[t, z][window])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_and_tiff_shard_like_in_memory_arrays(tmp_path, version):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    pairs = {"npy": [], "zarr": [], "tif": []}
    for i in range(2):
        image, instances = _nuclei(90, 70, i)
        image = np.stack([image, image // 2])  # 2 channels
        np.save(tmp_path / f"img{i}.npy", image)
        np.save(tmp_path / f"lbl{i}.npy", instances)
        root = zarr.open_group(tmp_path / f"img{i}.ome.zarr", mode="w", zarr_format=fmt.zarr_format)
        write_image(image, root, axes="cyx", fmt=fmt, storage_options={"chunks": (1, 32, 32)},
                    scale={"c": 1.0, "y": 0.5, "x": 0.5}, axes_units={"y": "micrometer", "x": "micrometer"})
        tifffile.imwrite(tmp_path / f"img{i}.tif", image, tile=(32, 32), compression="zstd", metadata={"axes": "CYX"})
        for kind in pairs:
            suffix = "ome.zarr" if kind == "zarr" else kind
            pairs[kind].append((tmp_path / f"img{i}.{suffix}", tmp_path / f"lbl{i}.npy"))
    cfg = replace(CFG, labels="instances", region_pixels=65536)
    out = {kind: write_shards(p, tmp_path / kind, cfg, num_classes=2) for kind, p in pairs.items()}
    assert out["zarr"]["pixel_size"] == {"Y": [0.5, "micrometer"], "X": [0.5, "micrometer"]}
    assert out["npy"]["pixel_size"] is None and out["zarr"]["inputs"][0]["axes"] == "CYX"
    reference = _everything(tmp_path / "npy", out["npy"])
    for kind in ("zarr", "tif"):
        assert out[kind]["stats"] == out["npy"]["stats"]
        found = _everything(tmp_path / kind, out[kind])
        assert found.keys() == reference.keys()
        for key, sample in found.items():
            np.testing.assert_array_equal(sample["img"], reference[key]["img"])
            np.testing.assert_array_equal(sample["lbl"], reference[key]["lbl"])


def test_float_labels_with_fractions_are_refused_not_rounded(tmp_path):
    image = np.zeros((40, 40), np.uint16)
    label = np.zeros((40, 40), np.float32)
    label[5, 5] = 0.5
    for i in range(2):
        np.save(tmp_path / f"i{i}.npy", image)
        np.save(tmp_path / f"l{i}.npy", label if i else np.round(label))
    from unetdist.data.errors import DataError

    with pytest.raises(DataError, match=r"l1\.npy: label holds non-integer values"):
        write_shards([(tmp_path / f"i{i}.npy", tmp_path / f"l{i}.npy") for i in range(2)], tmp_path / "out", CFG,
                     num_classes=2)


def test_czi_z_stack_is_sharded_like_its_pixels(tmp_path):
    pyczi = pytest.importorskip("pylibCZIrw.czi")
    rng = np.random.default_rng(7)
    data = rng.integers(0, 4096, (3, 2, 40, 50), dtype=np.uint16)  # Z C Y X
    with pyczi.create_czi(str(tmp_path / "stack.czi"), exist_ok=True) as czi:
        for z in range(3):
            for c in range(2):
                czi.write(data=data[z, c], plane={"Z": z, "C": c, "T": 0}, location=(0, 0))
        czi.write_metadata(document_name="test", scale_x=0.2e-6, scale_y=0.2e-6, scale_z=1e-6)
    labels = rng.integers(0, 2, (3, 40, 50), dtype=np.uint8)
    np.save(tmp_path / "stack_masks.npy", labels)
    manifest = write_shards([(tmp_path / "stack.czi", tmp_path / "stack_masks.npy")], tmp_path / "out",
                            replace(CFG, tile=16, overlap=0), num_classes=2)
    entry = manifest["inputs"][0]
    assert (entry["frames"], entry["channels"], entry["axes"]) == (3, 2, "ZCYX")
    assert entry["pixel_size"]["X"][0] == pytest.approx(0.2) and entry["pixel_size"]["Z"][0] == pytest.approx(1.0)
    for sample in _everything(tmp_path / "out", manifest).values():
        meta = sample["meta"]
        h, w = meta["valid_h"], meta["valid_w"]
        rows, cols = slice(meta["y"], meta["y"] + h), slice(meta["x"], meta["x"] + w)
        np.testing.assert_array_equal(sample["img"][:, :h, :w], data[meta["frame"], :, rows, cols])
        np.testing.assert_array_equal(sample["lbl"][:h, :w], labels[meta["frame"], rows, cols])
