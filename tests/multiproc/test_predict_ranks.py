"""Prediction in 2 real gloo processes: each output written exactly once, and equal to 1 process.

Three runs share one process group: 5 images dealt whole to the ranks; one image large enough
to be split into bands of window rows (the ranks' weighted sums meet at the owner); and a
5-frame stack dealt frame by frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.multiproc.spawn import spawn
from unetdist.parallel.env import DistEnv
from unetdist.infer.model_file import model_file_state
from unetdist.infer.predict import PredictOptions
from unetdist.infer.run import OutputOptions, predict_files
from unetdist.model import UNet

pytestmark = pytest.mark.slow

OPTIONS = PredictOptions(tile=32, overlap=8, batch_size=4)
OUTPUTS = OutputOptions(probabilities=True, prob_dtype="float32", instances=True)
CASES = ("five", "huge", "stack")


def _inputs(root: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    noise = lambda *shape: rng.integers(0, 3000, shape).astype(np.uint16)  # noqa: E731
    folders = {case: root / "in" / case for case in CASES}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i, shape in enumerate([(40, 50), (64, 64), (33, 90), (50, 41), (70, 30)]):
        tifffile.imwrite(folders["five"] / f"img_{i}.tif", noise(*shape))
    tifffile.imwrite(folders["huge"] / "field.tif", noise(150, 120))
    tifffile.imwrite(folders["stack"] / "movie.tif", noise(5, 40, 40), photometric="minisblack")
    return {case: [str(folder)] for case, folder in folders.items()}


def _worker(model: str, root: str) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed

    env = init_distributed()
    try:
        inputs = _inputs_listed(Path(root))
        for case in CASES:
            summary = predict_files(model, inputs[case], Path(root) / "two" / case, OPTIONS, OUTPUTS, env)
            (Path(root) / "two" / f"{case}.rank{env.rank}.json").write_text(json.dumps(summary))
    finally:
        destroy_distributed()


def _inputs_listed(root: Path) -> dict[str, list[str]]:
    return {case: [str(root / "in" / case)] for case in CASES}


def test_two_ranks_write_each_output_once_and_match_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    stats = {"low": [0.0], "high": [3000.0], "clipped_mean": [1500.0], "clipped_std": [800.0]}
    torch.save(model_file_state(UNet(in_channels=1, num_classes=3, base_width=4, depth=2), stats), model)
    inputs = _inputs(tmp_path)
    spawn(_worker, 2, str(model), str(tmp_path))
    alone = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    for case in CASES:
        one = predict_files(model, inputs[case], tmp_path / "one" / case, OPTIONS, OUTPUTS, alone)
        ranks = [json.loads((tmp_path / "two" / f"{case}.rank{r}.json").read_text()) for r in (0, 1)]
        written = [set(r["written"]) for r in ranks]
        expected = {str(p) for p in (tmp_path / "two" / case).glob("*.tif")}
        assert written[0].isdisjoint(written[1]), f"{case}: a file written by both ranks"
        assert written[0] | written[1] == expected and len(expected) == 3 * len(one["files"])
        if case == "five":
            assert written[0] and written[1], "both ranks got images"
        else:
            assert [f["shared"] for f in ranks[0]["files"]] == [True], f"{case} is shared by the ranks"
        assert ranks[0]["world_size"] == 2
        for path in sorted((tmp_path / "one" / case).glob("*.tif")):
            a, b = tifffile.imread(path), tifffile.imread(tmp_path / "two" / case / path.name)
            if path.name.endswith("_probs.tif"):
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=path.name)
            else:
                assert np.array_equal(a, b), path.name
