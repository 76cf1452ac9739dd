from pathlib import Path

import pytest
import torch

from unetdist.train.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint


def test_atomic_save_keep_last_and_resume(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    latest = resolve_resume("auto", tmp_path)
    assert latest is not None and load_checkpoint(latest)["step"] == 40
    assert resolve_resume("never", tmp_path) is None


def test_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"step": 5}, keep_last=3)
    # a crash mid-write leaves only the temporary name behind
    (tmp_path / "step_000000009.pt.tmp").write_bytes(b"truncated")
    path = resolve_resume("auto", tmp_path)
    assert path is not None and path.name == "step_000000005.pt"
    save_checkpoint(tmp_path, 6, {"step": 6}, keep_last=3)
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_and_missing_path_errors(tmp_path: Path) -> None:
    bad = tmp_path / "step_000000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="step_000000001.pt cannot be loaded"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="run.resume"):
        resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_weights_only_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: D105
            return (print, ("pwned",))

    path = tmp_path / "step_000000002.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        load_checkpoint(path)
