"""ensure_dataset: the synthetic default is made exactly once, even by processes starting together."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from unetdist.config import DataConfig, SynthConfig, load_config
from unetdist.data import default as default_module
from unetdist.data.default import ensure_dataset
from unetdist.data.shards import DataError


def tiny(root: Path | str, generate: bool = True, boundary: bool = False, config_file: Path | None = None) -> DataConfig:
    """The data section as `unetdist train` builds it, with data.generate given on the command line."""
    overrides = [f"data.root={root}", "data.synth.images=3", "data.synth.height=32", "data.synth.width=32",
                 "data.synth.seed=1", f"data.synth.boundary={str(boundary).lower()}", "data.shard.tile=16",
                 "data.shard.val_fraction=0.34"]
    if config_file is None:
        overrides.append(f"data.generate={str(generate).lower()}")
    return load_config(config_file, overrides).data


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
    with pytest.raises(DataError, match="holds files but no manifest.json") as info:
        ensure_dataset(tiny(root), 2)
    assert "remove" not in str(info.value) and "delete" not in str(info.value)  # never advise deleting their files
    assert (root / "notes.txt").read_text() == "mine"


def test_generate_from_a_config_file_does_not_follow_a_typo_in_data_root(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  root: data/synth-default\n  generate: true\n")
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "my-shrads"
    with pytest.raises(FileNotFoundError, match=r"no dataset in .*my-shrads .*only generates into the shipped roots"):
        ensure_dataset(tiny(typo, config_file=config), 2)
    assert not typo.exists() and not (tmp_path / "my-shrads.lock").exists()
    shipped = tiny("data/synth-default", config_file=config)  # the file's own, shipped root: generated
    assert ensure_dataset(shipped, 2) == Path("data/synth-default")
    assert (tmp_path / "data/synth-default/manifest.json").is_file()


def test_a_url_root_never_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = "http://127.0.0.1:9/shards"
    assert ensure_dataset(tiny(url), 2) == url  # returned as is; its manifest is read from the server
    assert list(tmp_path.iterdir()) == []  # no local folder named `http:`


def test_class_count_must_match_the_synthetic_labels(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="3 classes"):
        ensure_dataset(tiny(tmp_path / "ds", boundary=True), 2)
    assert ensure_dataset(tiny(tmp_path / "ds", boundary=True), 3) == tmp_path / "ds"
