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
])
def test_malformed_manifest_names_file_and_key(tmp_path: Path, tiny_data: Path, damage, message: str) -> None:
    raw = json.loads((tiny_data / "manifest.json").read_text())
    broken = copy.deepcopy(raw)
    damage(broken)
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(DataError) as err:
        open_manifest(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


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
