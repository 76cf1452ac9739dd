"""No code runs from a file a user points at: a pickle whose `__reduce__` writes a marker file is planted where
`predict`, `evaluate`, `export` and training's resume look, and the real commands must refuse it, naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, REPO, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 5, "module": {"w": torch.ones(1)}, "payload": _Planted(marker)}, path)
    return path


def _refused(proc, marker: Path, planted: Path) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert not marker.exists(), "code from the planted file ran"
    assert "asks to run or build" in output and str(planted.name) in output, output[-3000:]


def test_predict_evaluate_export_and_resume_never_run_a_planted_pickle(tmp_path: Path, tiny_data: Path) -> None:
    marker = tmp_path / "marker"
    image = next((tiny_data / "raw").glob("img_*.tif"))
    label = image.with_name(image.name.replace("img_", "lbl_"))  # its own label: evaluate pairs by name
    infer = [PYTHON, "-m", "unetdist.cli"]

    ds_dir = tmp_path / "ds"  # a folder holding a DeepSpeed-looking file: predict DIR, evaluate, export DIR
    planted = _plant(ds_dir / "mp_rank_00_model_states.pt", marker)
    _refused(run_cmd([*infer, "predict", "--model", str(ds_dir), "--images", str(image), "--out", str(tmp_path / "p")], env=ENV),
             marker, planted)
    _refused(run_cmd([*infer, "evaluate", "--model", str(ds_dir), "--images", str(image), "--labels", str(label),
                      "--out", str(tmp_path / "e")], env=ENV), marker, planted)
    _refused(run_cmd([*infer, "export", "--model", str(ds_dir), "--out", str(tmp_path / "m.pt")], env=ENV), marker, planted)

    run_dir = tmp_path / "run"  # a step_* folder in a run folder, then a checkpoint file
    planted = _plant(run_dir / "checkpoints" / "step_000000005" / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    _refused(run_cmd([*infer, "predict", "--model", str(run_dir), "--images", str(image), "--out", str(tmp_path / "p")], env=ENV),
             marker, planted)
    _refused(run_cmd([*infer, "export", "--model", str(run_dir), "--out", str(tmp_path / "m.pt")], env=ENV), marker, planted)
    _refused(_train(run_dir, tiny_data, "parallel.backend=deepspeed"), marker, planted)
    planted.unlink()
    planted.parent.rmdir()
    planted = _plant(run_dir / "checkpoints" / "step_000000005.pt", marker)
    _refused(run_cmd([*infer, "export", "--model", str(planted), "--out", str(tmp_path / "m.pt")], env=ENV), marker, planted)
    train = _train(run_dir, tiny_data)
    _refused(train, marker, planted)
    assert "none of the 1 checkpoints" in train.stderr + train.stdout


def _train(run_dir: Path, data: Path, *extra: str):
    return run_cmd([PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
                    *tiny_overrides(run_dir, data), "train.steps=8", *extra], env=ENV)
