"""`unetdist bench loader` end to end on a tiny dataset: both pipelines run on the same tiles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from unetdist.bench.loader import add_loader_arguments, run_loader_bench, write_per_file
from unetdist.config import ShardConfig
from unetdist.data.manifest import open_manifest
from unetdist.data.reader import decode, shard_samples
from unetdist.data.shards import write_shards
from unetdist.data.synth import generate_dataset
from unetdist.config import SynthConfig


def test_bench_runs_and_reports_both_pipelines(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    args = parser.parse_args(["--images", "3", "--image-size", "128", "--tile", "64", "--batch-size", "4",
                              "--batches", "2", "--repeats", "1", "--augment", "full", "--crop", "48",
                              "--json", str(tmp_path / "r.json")])
    assert run_loader_bench(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tiles"] == 8 and result["weight_maps"] and result["crop"] == 48  # 2 train images x 4 tiles
    assert result["ours_median"] > 0 and result["baseline_median"] > 0 and result["ours_device_side_median"] > 0
    assert abs(result["ratio"] - result["ours_median"] / result["baseline_median"]) < 1e-9
    assert "tiles/s per core" in capsys.readouterr().out


def test_per_file_copies_are_the_shard_tiles_bit_exact(tmp_path: Path) -> None:
    pairs = generate_dataset(tmp_path / "raw", SynthConfig(images=2, height=64, width=64))
    write_shards(pairs, tmp_path / "shards", ShardConfig(tile=32, val_fraction=0.5), num_classes=2)
    manifest = open_manifest(tmp_path / "shards")
    assert write_per_file(manifest, tmp_path / "files", "png") == 4
    tiles = [decode(s, 2) for url in manifest.train_shards for s in shard_samples(url)]
    for index, (image, label, _) in enumerate(tiles):
        png = np.array(Image.open(tmp_path / "files" / f"img_{index:06d}.png"))
        assert png.dtype == np.uint16
        np.testing.assert_array_equal(png, image[0])
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "files" / f"lbl_{index:06d}.png")), label)
