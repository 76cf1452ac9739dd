"""The checkpoint module: atomic files, keep-last-k, discovery that falls back past damage, no code from files."""

from pathlib import Path

import pytest
import torch

from unetdist.train.checkpoint import (
    CheckpointError, list_checkpoints, load_checkpoint, model_file_state, read_newest, read_weights, save_checkpoint,
    select_resume, write_model_file,
)


class Marker:
    """Unpickling it would create a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: D105
        return (exec, (f"open({str(self.path)!r}, 'w').write('ran')",))


def test_atomic_save_keep_last_and_resume(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    found = select_resume("auto", tmp_path)
    assert found is not None and found[1]["step"] == 40 and torch.equal(found[1]["w"], torch.full((3,), 40.0))
    assert select_resume("never", tmp_path) is None
    assert select_resume("auto", tmp_path / "empty") is None


def test_half_written_checkpoint_is_ignored_and_removed_by_the_next_save(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"step": 5}, keep_last=3)
    (tmp_path / "step_000000009.pt.tmp").write_bytes(b"truncated")  # a crash mid-write leaves only this
    found = select_resume("auto", tmp_path)
    assert found is not None and found[0].name == "step_000000005.pt"
    save_checkpoint(tmp_path, 6, {"step": 6}, keep_last=3)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.randn(1000)}, keep_last=3)
    newest = tmp_path / "step_000000030.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    found = select_resume("auto", tmp_path)
    assert found is not None and found[1]["step"] == 20
    assert "step_000000030.pt" in caplog.text and "previous" in caplog.text
    # no fallback for an explicit path: the user asked for that one
    with pytest.raises(CheckpointError, match="step_000000030.pt"):
        select_resume(str(newest), tmp_path)


def test_fails_only_when_no_checkpoint_loads(tmp_path: Path) -> None:
    (tmp_path / "step_000000001.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "step_000000002.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints .* can be read"):
        select_resume("auto", tmp_path)
    with pytest.raises(CheckpointError, match="run.resume"):
        select_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_code_in_a_checkpoint_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "step_000000002.pt"
    torch.save({"step": 2, "x": Marker(marker)}, path)
    with pytest.raises(CheckpointError, match=r"asks to run or build (builtins\.)?exec\b"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        select_resume("auto", tmp_path)
    assert not marker.exists()


def test_deepspeed_folder_is_verified_file_by_file(tmp_path: Path) -> None:
    """A folder in DeepSpeed's layout with one file that asks for code: refused before DeepSpeed reads it."""
    marker = tmp_path / "ran"
    good = tmp_path / "checkpoints" / "step_000000004"
    bad = tmp_path / "checkpoints" / "step_000000008"
    for folder, extra in ((good, {}), (bad, {"loss_scaler": Marker(marker)})):
        folder.mkdir(parents=True)
        torch.save({"step": int(folder.name[5:]), "module": {"w": torch.ones(2)}}, folder / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"x": torch.zeros(2)}, **extra},
                   folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    found = select_resume("auto", tmp_path / "checkpoints")
    assert found is not None and found[0] == good and found[1]["step"] == 4
    with pytest.raises(CheckpointError, match=r"asks to run or build (builtins\.)?exec\b"):
        read_weights(bad)
    assert not marker.exists()


def test_model_file_is_written_atomically_and_reads_back(tmp_path: Path) -> None:
    weights = {"w": torch.arange(4.0)}
    out = tmp_path / "sub" / "model.pt"
    write_model_file(out, model_file_state(weights, {"in_channels": 1}, {"stats": {}}, step=3))
    state, kind = read_weights(out)
    assert kind == "model-file" and state["step"] == 3 and torch.equal(state["model"]["w"], weights["w"])
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]
    with pytest.raises(ValueError, match="unetdist-model-v1"):
        write_model_file(out, {"model": weights})


def test_prediction_and_export_skip_a_damaged_newest_checkpoint_of_a_run_folder(tmp_path: Path) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        save_checkpoint(ckpts, step, {"step": step, "model": {"w": torch.full((2,), float(step))}}, keep_last=3)
    (ckpts / "step_000000002.pt").write_bytes(b"")
    state, used, kind = read_newest(tmp_path / "run")
    assert used.name == "step_000000001.pt" and state["step"] == 1 and kind == "ddp-checkpoint"
    with pytest.raises(CheckpointError, match="empty"):
        read_newest(ckpts / "step_000000002.pt")  # a file named explicitly is not replaced by another
