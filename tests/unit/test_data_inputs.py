"""`unetdist shard` inputs: CSV/YAML lists, TIFF stacks and time-lapse, channel axes, 8-bit PNG, instance
labels, weight maps, empty-tile rejection, shard counts, parallel writing, and bad input caught up front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetdist.config import ShardConfig
from unetdist.data.errors import DataError
from unetdist.data.inputs import read_list
from unetdist.data.shards import write_shards
from unetdist.data.synth import instances_to_labels, synth_image
from tests.unit.test_data_shards import all_samples, read_samples

TILE = ShardConfig(tile=16, shard_bytes=1 << 20, seed=0)


def _with(**kw: object) -> ShardConfig:
    return ShardConfig(**{**TILE.__dict__, **kw})


def test_csv_and_yaml_lists_force_the_split_and_resolve_relative_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(tmp_path / f"i{i}.npy", rng.integers(0, 4096, (20, 24), dtype=np.uint16))  # 12-bit in uint16
        np.save(tmp_path / f"l{i}.npy", rng.integers(0, 2, (20, 24), dtype=np.uint8))
    (tmp_path / "pairs.csv").write_text("image,label,split\ni0.npy,l0.npy,val\ni1.npy,l1.npy,train\ni2.npy,l2.npy,\n")
    pairs = read_list(tmp_path / "pairs.csv")
    assert [p.split for p in pairs] == ["val", "train", None] and pairs[0].image == tmp_path / "i0.npy"
    manifest = write_shards(pairs, tmp_path / "out", TILE, num_classes=2)
    assert manifest["val"]["sources"] == [str(tmp_path / "i0.npy")]
    assert manifest["train"]["sources"] == [str(tmp_path / "i1.npy"), str(tmp_path / "i2.npy")]
    (tmp_path / "pairs.yaml").write_text("pairs:\n- {image: i0.npy, label: l0.npy, split: train}\n"
                                         "- {image: i1.npy, label: l1.npy, split: val}\n")
    assert [p.split for p in read_list(tmp_path / "pairs.yaml")] == ["train", "val"]
    (tmp_path / "bad.csv").write_text("image,label,split\ni0.npy,l0.npy,test\n")
    with pytest.raises(DataError, match=r"bad\.csv, entry 1: split 'test'"):
        read_list(tmp_path / "bad.csv")
    (tmp_path / "nolabel.csv").write_text("image,split\ni0.npy,train\n")
    with pytest.raises(DataError, match="missing label"):
        read_list(tmp_path / "nolabel.csv")
    (tmp_path / "allval.csv").write_text("image,label,split\ni0.npy,l0.npy,val\n")
    with pytest.raises(DataError, match="no images for the train split"):
        write_shards(read_list(tmp_path / "allval.csv"), tmp_path / "out2", TILE, num_classes=2)


def test_time_lapse_frames_are_images_and_frame_blocks_never_leak(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    movie = rng.integers(0, 65536, (12, 20, 20), dtype=np.uint16)
    labels = rng.integers(0, 2, (12, 20, 20), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "movie.tif", movie)  # plain multi-page TIFF: each page is a frame
    tifffile.imwrite(tmp_path / "movie_lbl.tif", labels)
    pairs = [(tmp_path / "movie.tif", tmp_path / "movie_lbl.tif")]
    with pytest.raises(DataError, match="frame_block"):
        write_shards(pairs, tmp_path / "one", TILE, num_classes=2)  # one stack, one unit: nothing to split
    out = tmp_path / "out"
    manifest = write_shards(pairs, out, _with(frame_block=3, val_fraction=0.25), num_classes=2)
    assert manifest["channels"] == 1 and manifest["inputs"][0]["frames"] == 12
    frames = {s: {m["meta"]["frame"] for m in all_samples(out, manifest, s).values()} for s in ("train", "val")}
    assert not frames["train"] & frames["val"] and frames["train"] | frames["val"] == set(range(12))
    assert len(frames["val"]) == 3 and max(frames["val"]) - min(frames["val"]) == 2  # one contiguous block
    for sample in all_samples(out, manifest, "val").values():
        meta = sample["meta"]
        np.testing.assert_array_equal(sample["img"][0, :meta["valid_h"], :meta["valid_w"]],
                                      movie[meta["frame"], meta["y"]:meta["y"] + 16, meta["x"]:meta["x"] + 16])


def test_hyperstack_channels_and_explicit_axes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 65536, (2, 3, 18, 18), dtype=np.uint16)  # T, C, Y, X
    tifffile.imwrite(tmp_path / "h.tif", stack, imagej=True, metadata={"axes": "TCYX"})
    tifffile.imwrite(tmp_path / "h_lbl.tif", rng.integers(0, 2, (2, 18, 18), dtype=np.uint8))
    np.save(tmp_path / "yxc.npy", np.moveaxis(stack[0], 0, -1).copy())  # 18 x 18 x 3, read as Y, X, C
    np.save(tmp_path / "yxc_lbl.npy", rng.integers(0, 2, (18, 18), dtype=np.uint8))
    pairs = [(tmp_path / "h.tif", tmp_path / "h_lbl.tif"), (tmp_path / "yxc.npy", tmp_path / "yxc_lbl.npy")]
    manifest = write_shards(pairs, tmp_path / "out", _with(frame_block=1, val_fraction=0.5), num_classes=2)
    assert manifest["channels"] == 3 and manifest["tile_shape"] == [3, 16, 16]
    samples = {**all_samples(tmp_path / "out", manifest, "train"), **all_samples(tmp_path / "out", manifest, "val")}
    for sample in samples.values():
        meta = sample["meta"]
        source = stack[meta["frame"]] if meta["source_index"] == 0 else stack[0]  # yxc.npy holds frame 0
        expected = source[:, meta["y"]:meta["y"] + meta["valid_h"], meta["x"]:meta["x"] + meta["valid_w"]]
        np.testing.assert_array_equal(sample["img"][:, :meta["valid_h"], :meta["valid_w"]], expected)
    np.save(tmp_path / "tyx.npy", stack[:, 0])  # 2 x 18 x 18: auto would read 2 channels
    np.save(tmp_path / "tyx_lbl.npy", rng.integers(0, 2, (2, 18, 18), dtype=np.uint8))
    frames = write_shards([(tmp_path / "tyx.npy", tmp_path / "tyx_lbl.npy")], tmp_path / "explicit",
                          _with(axes="TYX", frame_block=1, val_fraction=0.5), num_classes=2)
    assert frames["channels"] == 1 and frames["inputs"][0]["frames"] == 2
    with pytest.raises(DataError, match=r"tyx\.npy: axes 'TCYX' do not fit an array of shape \(2, 18, 18\)"):
        write_shards([(tmp_path / "tyx.npy", tmp_path / "tyx_lbl.npy")] * 2, tmp_path / "bad", _with(axes="TCYX"),
                     num_classes=2)


def test_8bit_png_with_instance_labels_gives_classes_and_weight_maps(tmp_path: Path) -> None:
    pairs = []
    for i in range(2):
        image, instances = synth_image(seed=0, index=i, height=48, width=48)
        Image.fromarray((image >> 8).astype(np.uint8)).save(tmp_path / f"img{i}.png")  # 8-bit
        tifffile.imwrite(tmp_path / f"inst{i}.tif", instances.astype(np.uint16))
        pairs.append((tmp_path / f"img{i}.png", tmp_path / f"inst{i}.tif"))
    out = tmp_path / "out"
    manifest = write_shards(pairs, out, _with(labels="instances", weight_map=True, val_fraction=0.5, tile=24),
                            num_classes=3)
    assert manifest["dtype"] == "uint8" and manifest["weight_map"]["enabled"]
    assert len(manifest["weight_map"]["class_weights"]) == 3
    for split in ("train", "val"):
        for sample in all_samples(out, manifest, split).values():
            meta = sample["meta"]
            _, instances = synth_image(seed=0, index=meta["source_index"], height=48, width=48)
            classes = instances_to_labels(instances, boundary=True)
            window = (slice(meta["y"], meta["y"] + 24), slice(meta["x"], meta["x"] + 24))
            np.testing.assert_array_equal(sample["lbl"], classes[window])
            assert sample["wgt"].dtype == np.float16 and sample["wgt"].shape == (24, 24)
            assert sample["wgt"].min() > 0 and set(meta["crc32"]) == {"img.npy", "lbl.npy", "wgt.npy"}


def test_empty_tiles_are_rejected_in_training_only_and_min_shards_holds(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pairs = []
    for i in range(4):
        label = np.zeros((64, 64), np.uint8)
        label[:16, :16] = 1  # one tile of 16 with foreground, 15 empty ones
        np.save(tmp_path / f"i{i}.npy", rng.integers(0, 65536, (64, 64), dtype=np.uint16))
        np.save(tmp_path / f"l{i}.npy", label)
        pairs.append((tmp_path / f"i{i}.npy", tmp_path / f"l{i}.npy"))
    out = tmp_path / "out"
    manifest = write_shards(pairs, out, _with(min_foreground=0.01, empty_keep=0.0, min_shards=3), num_classes=2)
    train = all_samples(out, manifest, "train")
    assert len(train) == 3 and all(s["meta"]["foreground"] == 1.0 for s in train.values())
    assert manifest["train"]["rejected_empty"] == 45 and manifest["val"]["samples"] == 16
    assert len(manifest["train"]["shards"]) == 3  # one tile per shard: enough for 3 readers
    kept = write_shards(pairs, tmp_path / "half", _with(min_foreground=0.01, empty_keep=0.5), num_classes=2)
    assert 3 + 10 <= kept["train"]["samples"] <= 3 + 35  # about half of the 45 empty tiles (seeded)


def test_parallel_writing_gives_the_same_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pairs = []
    for i in range(3):
        np.save(tmp_path / f"i{i}.npy", rng.integers(0, 65536, (40, 40), dtype=np.uint16))
        np.save(tmp_path / f"l{i}.npy", rng.integers(0, 3, (40, 40), dtype=np.uint8))
        pairs.append((tmp_path / f"i{i}.npy", tmp_path / f"l{i}.npy"))
    serial = write_shards(pairs, tmp_path / "a", _with(weight_map=True, workers=1), num_classes=3)
    parallel = write_shards(pairs, tmp_path / "b", _with(weight_map=True, workers=2), num_classes=3)
    assert {k: v for k, v in serial.items() if k != "inputs"} == {k: v for k, v in parallel.items() if k != "inputs"}
    for shard in serial["train"]["shards"] + serial["val"]["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()


def test_bad_input_is_named_before_any_shard_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tifffile.imwrite(tmp_path / "movie.tif", rng.integers(0, 65536, (4, 16, 16), dtype=np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "movie_lbl.tif", np.zeros((3, 16, 16), np.uint8), photometric="minisblack")  # short
    np.save(tmp_path / "ok.npy", np.zeros((16, 16), np.uint16))
    np.save(tmp_path / "ok_lbl.npy", np.zeros((16, 16), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    ok = (tmp_path / "ok.npy", tmp_path / "ok_lbl.npy")
    cases = [
        ([ok, (tmp_path / "movie.tif", tmp_path / "movie_lbl.tif")], r"movie\.tif is 4 frame.*movie_lbl\.tif is 3x16x16"),
        ([ok, (tmp_path / "broken.png", tmp_path / "ok_lbl.npy")], r"cannot read .*broken\.png"),
        ([ok, (tmp_path / "missing.tif", tmp_path / "ok_lbl.npy")], r"cannot read .*missing\.tif"),
    ]
    for pairs, message in cases:
        with pytest.raises(DataError, match=message):
            write_shards(pairs, out, TILE, num_classes=2)
        assert not out.exists()  # nothing was written, not even the folder


def test_manifest_records_shapes_and_dataset(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((20, 20), np.uint16))
    np.save(tmp_path / "b.npy", np.zeros((20, 20), np.uint8))
    pairs = [(tmp_path / "a.npy", tmp_path / "b.npy")] * 2
    manifest = write_shards(pairs, tmp_path / "out", TILE, num_classes=2, dataset={"name": "x", "licence": "MIT"})
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saved["dataset"] == {"name": "x", "licence": "MIT"} and saved["tile_shape"] == [1, 16, 16]
    assert saved["inputs"][0] == {"image": str(pairs[0][0]), "label": str(pairs[0][1]), "frames": 1, "channels": 1,
                                  "height": 20, "width": 20, "axes": "YX", "pixel_size": {}}
    assert manifest["label_dtype"] == "uint8" and len(read_samples(tmp_path / "out" / "train-000000.tar")) == 4


def test_shard_command_with_a_list_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from unetdist.cli import main

    rng = np.random.default_rng(6)
    for i in range(2):
        tifffile.imwrite(tmp_path / f"i{i}.tif", rng.integers(0, 65536, (20, 20), dtype=np.uint16))
        tifffile.imwrite(tmp_path / f"l{i}.tif", rng.integers(1, 4, (20, 20), dtype=np.uint16))  # instance ids
    (tmp_path / "pairs.csv").write_text("image,label,split\ni0.tif,l0.tif,train\ni1.tif,l1.tif,val\n")
    code = main(["shard", "--list", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "out"), "--tile", "16",
                 "--num-classes", "3", "--label-type", "instances", "--weight-map", "--min-shards", "2"])
    assert code == 0 and "wrote 4 train tiles in 2 shards and 4 validation tiles" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["weight_map"]["enabled"]
    code = main(["shard", "--list", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "bad"), "--tile", "16"])
    assert code == 2 and "l0.tif: label value 3 is outside [0, num_classes=2)" in capsys.readouterr().err
    code = main(["shard", "--images", str(tmp_path / "i*.tif"), "--out", str(tmp_path / "x")])
    assert code == 2 and "--images and --labels go together" in capsys.readouterr().err
