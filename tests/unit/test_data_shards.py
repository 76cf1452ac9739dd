"""Shard writing: lossless uint16, split by image, manifest, crash safety and clear input errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from unetdist.config import ShardConfig
from unetdist.data import samples as samples_module
from unetdist.data.shards import DataError, as_chw, load_array, read_pairs, write_shards
from unetdist.data.tiling import tile_grid

SIZES = [(40, 24), (16, 16), (33, 20), (20, 47), (24, 24), (17, 31)]


def make_pairs(folder: Path, sizes: list[tuple[int, int]] = SIZES, classes: int = 3) -> list[tuple[Path, Path]]:
    """Random full-range uint16 images (0 and 65535 included) and labels as .npy files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    pairs = []
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        image[0, 0], image[-1, -1] = 0, 65535
        np.save(folder / f"img_{i:02d}.npy", image)
        np.save(folder / f"lbl_{i:02d}.npy", rng.integers(0, classes, (h, w), dtype=np.uint8))
        pairs.append((folder / f"img_{i:02d}.npy", folder / f"lbl_{i:02d}.npy"))
    return pairs


def read_samples(tar_path: Path) -> dict[str, dict]:
    """Every sample of a shard, decoded by hand: {key: {"img", "lbl", "meta"}}."""
    samples: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            entry = samples.setdefault(key, {})
            if suffix == "json":
                entry["meta"] = json.loads(data)
            else:
                entry[suffix.split(".")[0]] = np.load(io.BytesIO(data), allow_pickle=False)
    return samples


def all_samples(out: Path, manifest: dict, split: str) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for shard in manifest[split]["shards"]:
        found.update(read_samples(out / shard["name"]))
    return found


CFG = ShardConfig(tile=16, overlap=3, shard_bytes=16 * 1024, val_fraction=0.34, seed=1)


def test_uint16_round_trip_is_bit_exact_and_tiles_are_where_the_json_says(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = write_shards(pairs, out, CFG, num_classes=3)
    originals = {i: (np.load(p), np.load(q)) for i, (p, q) in enumerate(pairs)}
    seen = set()
    for split in ("train", "val"):
        for key, sample in all_samples(out, manifest, split).items():
            meta = sample["meta"]
            image, label = originals[meta["source_index"]]
            y, x, vh, vw = meta["y"], meta["x"], meta["valid_h"], meta["valid_w"]
            assert sample["img"].dtype == np.uint16 and sample["img"].shape == (1, 16, 16)
            assert sample["lbl"].dtype == np.uint8 and sample["lbl"].shape == (16, 16)
            np.testing.assert_array_equal(sample["img"][0, :vh, :vw], image[y : y + vh, x : x + vw])
            np.testing.assert_array_equal(sample["lbl"][:vh, :vw], label[y : y + vh, x : x + vw])
            assert meta["split"] == split
            seen.add((meta["source_index"], y, x))
    expected = {(i, y, x) for i, (h, w) in enumerate(SIZES) for y, x in tile_grid(h, w, 16, 3)}
    assert seen == expected  # every tile of every image, once


def test_split_by_source_image_without_leaks(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = write_shards(pairs, out, CFG, num_classes=3)
    train_sources = {s["meta"]["source"] for s in all_samples(out, manifest, "train").values()}
    val_sources = {s["meta"]["source"] for s in all_samples(out, manifest, "val").values()}
    assert train_sources and val_sources and not train_sources & val_sources
    assert train_sources | val_sources == {str(p) for p, _ in pairs}
    assert set(manifest["train"]["sources"]) == train_sources and set(manifest["val"]["sources"]) == val_sources
    assert len(val_sources) == round(0.34 * len(pairs))
    other = write_shards(pairs, tmp_path / "other", ShardConfig(**{**CFG.__dict__, "seed": 2}), num_classes=3)
    splits = [m["val"]["sources"] for m in (manifest, other)]
    assert splits[0] != splits[1]  # the seed decides the split


def test_manifest_contents_and_statistics(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = write_shards(pairs, out, CFG, num_classes=3)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert (manifest["tile"], manifest["overlap"], manifest["channels"]) == (16, 3, 1)
    assert (manifest["dtype"], manifest["num_classes"]) == ("uint16", 3)
    for split in ("train", "val"):
        counts = [len(read_samples(out / s["name"])) for s in manifest[split]["shards"]]
        assert counts == [s["samples"] for s in manifest[split]["shards"]]
        assert sum(counts) == manifest[split]["samples"]
        for s in manifest[split]["shards"]:
            assert (out / s["name"]).stat().st_size <= CFG.shard_bytes
    assert len(manifest["train"]["shards"]) > 1
    train = [i for i, (p, _) in enumerate(pairs) if str(p) in manifest["train"]["sources"]]
    pixels = np.concatenate([np.load(pairs[i][0]).ravel() for i in train]).astype(np.float64)
    stats = manifest["stats"]
    low, high = np.percentile(pixels, [0.5, 99.5], method="inverted_cdf")
    assert (stats["low"], stats["high"]) == ([low], [high])
    np.testing.assert_allclose([stats["mean"][0], stats["std"][0]], [pixels.mean(), pixels.std()], rtol=1e-9)
    clipped = np.clip(pixels, low, high)
    np.testing.assert_allclose([stats["clipped_mean"][0], stats["clipped_std"][0]], [clipped.mean(), clipped.std()])
    labels = np.concatenate([np.load(pairs[i][1]).ravel() for i in train])
    np.testing.assert_allclose(manifest["train"]["class_frequencies"], np.bincount(labels, minlength=3) / labels.size)


def test_same_input_gives_identical_shards(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "raw")
    first = write_shards(pairs, tmp_path / "a", CFG, num_classes=3)
    write_shards(pairs, tmp_path / "b", CFG, num_classes=3)
    for s in first["train"]["shards"] + first["val"]["shards"]:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()


def test_failure_midway_keeps_the_older_dataset_and_leaves_nothing(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = make_pairs(tmp_path / "raw")
    out = tmp_path / "out"
    write_shards(pairs, out, CFG, num_classes=3)  # an older complete dataset in the same folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = samples_module.npy_bytes

    def failing(array: np.ndarray) -> bytes:
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk full (simulated)")
        return real(array)

    monkeypatch.setattr(samples_module, "npy_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        write_shards(pairs, out, CFG, num_classes=3)
    assert calls["n"] == 40
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old dataset, no new shards or .tmp files


def test_bad_label_stops_before_anything_is_written(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = write_shards(pairs, out, CFG, num_classes=3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = next(q for p, q in pairs if str(p) in manifest["val"]["sources"])
    label = np.load(bad)
    label[3, 4] = 7
    np.save(bad, label)
    with pytest.raises(DataError, match=rf"{bad.name}.*label value 7.*num_classes=3"):
        write_shards(pairs, out, CFG, num_classes=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the older dataset is untouched


def test_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "raw")
    np.save(pairs[1][1], np.zeros((16, 15), np.uint8))
    with pytest.raises(DataError, match=r"img_01\.npy.*16x16.*lbl_01\.npy.*16x15"):
        write_shards(pairs, tmp_path / "out", CFG, num_classes=3)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unreadable_and_unsupported_files_are_named(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "raw", SIZES[:2])
    broken = tmp_path / "raw" / "broken.tif"
    broken.write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="cannot read .*broken.tif"):
        write_shards([(broken, pairs[0][1]), pairs[1]], tmp_path / "out", CFG, num_classes=3)
    with pytest.raises(DataError, match=r"unsupported file type '\.jpg'"):
        load_array(tmp_path / "x.jpg")


def test_empty_input_and_globs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty input"):
        write_shards([], tmp_path / "out", CFG, num_classes=2)
    make_pairs(tmp_path / "raw", SIZES[:3])
    with pytest.raises(DataError, match="no files match the images glob"):
        read_pairs(str(tmp_path / "raw" / "nothing_*.npy"), str(tmp_path / "raw" / "lbl_*.npy"))
    (tmp_path / "raw" / "lbl_99.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 label\(s\) without their image: .*lbl_99.npy"):
        read_pairs(str(tmp_path / "raw" / "img_*.npy"), str(tmp_path / "raw" / "lbl_*.npy"))
    (tmp_path / "raw" / "lbl_99.npy").unlink()
    pairs = read_pairs(str(tmp_path / "raw" / "img_*.npy"), str(tmp_path / "raw" / "lbl_*.npy"))
    assert [(p.name, q.name) for p, q in pairs] == [(f"img_{i:02d}.npy", f"lbl_{i:02d}.npy") for i in range(3)]
    with pytest.raises(DataError, match="at least 2 images"):
        write_shards(pairs[:1], tmp_path / "out", CFG, num_classes=3)


def test_channel_layout_rule() -> None:
    path = Path("x.npy")
    assert as_chw(np.zeros((20, 24), np.uint16), path).shape == (1, 20, 24)
    assert as_chw(np.zeros((20, 24, 3), np.uint16), path).shape == (3, 20, 24)  # H x W x C (RGB-like)
    assert as_chw(np.zeros((2, 20, 24), np.uint16), path).shape == (2, 20, 24)  # C x H x W
    assert as_chw(np.zeros((3, 3, 3), np.uint16), path).shape == (3, 3, 3)  # ambiguous: channels first
    hwc = np.arange(5 * 6 * 2, dtype=np.uint16).reshape(5, 6, 2)
    np.testing.assert_array_equal(as_chw(hwc, path)[1], hwc[:, :, 1])
    with pytest.raises(DataError, match="expected H x W"):
        as_chw(np.zeros((2, 2, 20, 24)), path)


def test_tiff_multichannel_and_16bit_png_are_lossless(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 65536, (2, 20, 18), dtype=np.uint16) for _ in range(2)]
    pairs = []
    for i, image in enumerate(images):
        tifffile.imwrite(tmp_path / f"img{i}.tif", image, metadata={"axes": "CYX"})  # plain pages would be frames
        tifffile.imwrite(tmp_path / f"lbl{i}.tiff", rng.integers(0, 2, (20, 18), dtype=np.uint8))
        pairs.append((tmp_path / f"img{i}.tif", tmp_path / f"lbl{i}.tiff"))
    manifest = write_shards(pairs, tmp_path / "out", ShardConfig(tile=8, val_fraction=0.5), num_classes=2)
    assert manifest["channels"] == 2 and len(manifest["stats"]["low"]) == 2
    image_pil = pytest.importorskip("PIL.Image")
    png = tmp_path / "img.png"
    image_pil.fromarray(images[0][0]).save(png)
    np.testing.assert_array_equal(load_array(png), images[0][0])
    assert load_array(png).dtype == np.uint16
