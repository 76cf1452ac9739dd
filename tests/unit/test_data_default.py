"""ensure_dataset: the synthetic default is made exactly once, even by processes starting together."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from unetdist.config import DataConfig, ShardConfig, SynthConfig
from unetdist.data import default as default_module
from unetdist.data.default import ensure_dataset
from unetdist.data.shards import DataError


def tiny(root: Path, generate: bool = True, boundary: bool = False) -> DataConfig:
    return DataConfig(root=str(root), generate=generate,
                      synth=SynthConfig(images=3, height=32, width=32, seed=1, boundary=boundary),
                      shard=ShardConfig(tile=16, val_fraction=0.34))


def _start_together(root: str, log: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    """Child process: record every generation in `log` (slowly, to widen the race) then ensure."""
    real = default_module.generate_dataset

    def logged(out_dir: Path, synth: SynthConfig) -> list:
        with open(log, "a") as fh:
            fh.write(f"{out_dir}\n")
        time.sleep(0.5)
        return real(out_dir, synth)

    default_module.generate_dataset = logged
    barrier.wait()
    assert ensure_dataset(tiny(Path(root)), 2) == Path(root)
    assert (Path(root) / "manifest.json").is_file()


def test_two_processes_started_together_make_the_dataset_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    root, log = tmp_path / "data" / "synth", tmp_path / "generations.log"
    procs = [ctx.Process(target=_start_together, args=(str(root), str(log), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert (root / "manifest.json").is_file() and len(list(root.glob("*.tar"))) >= 2
    assert (root / "raw" / "img_0000.tif").is_file()  # the generated images travel with the shards
    assert sorted(p.name for p in root.parent.iterdir()) == ["synth", "synth.lock"]  # no temporary folder left


def test_existing_dataset_is_returned_without_generating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ds"
    ensure_dataset(tiny(root), 2)
    monkeypatch.setattr(default_module, "generate_dataset", lambda *a: pytest.fail("generated twice"))
    assert ensure_dataset(tiny(root, generate=False), 2) == root


def test_missing_dataset_without_generate_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no dataset in .*nowhere.*unetdist shard.*data\.generate=true"):
        ensure_dataset(tiny(tmp_path / "nowhere", generate=False), 2)


def test_refuses_to_overwrite_a_folder_without_manifest(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no manifest.json"):
        ensure_dataset(tiny(root), 2)
    assert (root / "notes.txt").read_text() == "mine"


def test_class_count_must_match_the_synthetic_labels(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="3 classes"):
        ensure_dataset(tiny(tmp_path / "ds", boundary=True), 2)
    assert ensure_dataset(tiny(tmp_path / "ds", boundary=True), 3) == tmp_path / "ds"
