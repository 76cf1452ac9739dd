"""Malformed manifests fail in one line naming the file and key; shard names may not leave data.root."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from unetdist.data.errors import DataError
from unetdist.data.manifest import open_manifest


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def apply(m: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[int(key)] if key.isdigit() else m[key]
        m[int(last) if last.isdigit() else last] = value
    return apply


def _drop(path: str) -> Callable[[dict], None]:
    def apply(m: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        del m[last]
    return apply


@pytest.mark.parametrize("damage, message", [
    (_drop("stats"), "manifest.json: stats is missing"),
    (_drop("stats.clipped_std"), "manifest.json: stats.clipped_std is missing"),
    (_set("stats.low.0", "abc"), "manifest.json: stats.low[0] must be a number, got 'abc'"),
    (_set("stats.high", [1.0, 2.0]), "manifest.json: stats.high has 2 value(s) for 1 channel(s)"),
    (_set("tile", "32"), "manifest.json: tile must be an integer >= 1, got '32'"),
    (_set("channels", None), "manifest.json: channels is missing"),
    (_set("val.shards.0.samples", 1.5), "manifest.json: val.shards[0].samples must be an integer >= 0, got 1.5"),
    (_drop("train.class_frequencies"), "manifest.json: train.class_frequencies is missing"),
    (_set("train", []), "manifest.json: train must be a mapping, got []"),
    (_set("image_percentiles", [1, 2]), "manifest.json: image_percentiles must be a mapping, got [1, 2]"),
    (_drop("image_percentiles.images"), "manifest.json: image_percentiles.images is missing"),
    (_set("image_percentiles.percentiles", []), "manifest.json: image_percentiles.percentiles must be a non-empty"),
    (_set("image_percentiles.percentiles.1", 101), "manifest.json: image_percentiles.percentiles[1] must be a "
                                                    "percentile in [0, 100], got 101"),
    (_set("image_percentiles.max_pixels", 0), "manifest.json: image_percentiles.max_pixels must be an integer >= 1"),
    (_set("image_percentiles.images", []), "manifest.json: image_percentiles.images has 0 entries for"),
    (_set("image_percentiles.images.0", None), "manifest.json: image_percentiles.images[0] must be a non-empty list"),
    (_set("image_percentiles.images.0.0", [[1.0]]), "manifest.json: image_percentiles.images[0][0][0] must hold"),
    (_set("image_percentiles.images.0.0.0.3", "x"), "manifest.json: image_percentiles.images[0][0][0][3] must be "
                                                     "a number, got 'x'"),
    (_set("normalization", {"mode": "zscore"}), "manifest.json: normalization.mode must be one of percentile, "
                                                "dataset, got 'zscore'"),
    (_set("normalization", {"mode": "percentile", "percentiles": [99, 1]}),
     "manifest.json: normalization.percentiles must be [low, high] with low < high"),
])
def test_malformed_manifest_names_file_and_key(tmp_path: Path, tiny_data: Path, damage, message: str) -> None:
    raw = json.loads((tiny_data / "manifest.json").read_text())
    broken = copy.deepcopy(raw)
    damage(broken)
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(DataError) as err:
        open_manifest(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_manifest_without_percentiles_still_opens(tmp_path: Path, tiny_data: Path) -> None:
    """Datasets sharded before per-image percentiles existed open (only data.normalize.mode=dataset can use them)."""
    raw = json.loads((tiny_data / "manifest.json").read_text())
    assert raw["image_percentiles"]["images"]  # what the check above damages
    del raw["image_percentiles"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert open_manifest(tmp_path).image_percentiles == ()


@pytest.mark.parametrize("name", ["../elsewhere/train-000000.tar", "sub/../../x.tar", "/etc/passwd",
                                  "http://example.org/x.tar", "pipe:cat /etc/passwd"])
def test_shard_outside_the_dataset_folder_is_refused(tmp_path: Path, tiny_data: Path, name: str) -> None:
    raw = json.loads((tiny_data / "manifest.json").read_text())
    raw["train"]["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"train.shards\[0\].name=.* points outside the dataset folder"):
        open_manifest(tmp_path)
    raw["train"]["shards"][0]["name"] = "sub/train-000000.tar"  # a sub-folder is fine
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert open_manifest(tmp_path).train_shards[0] == str(tmp_path / "sub/train-000000.tar")
