"""Prediction in 2 real gloo processes: units split between the ranks, each output finished once, equal to 1 process.

Three runs share one process group: 5 images dealt whole to the ranks (tiled OME-TIFF outputs);
one image split into column blocks and bands of chunk rows whose chunks both ranks write into the same OME-Zarr
stores; and a 5-frame stack (OME-Zarr, frames split between the ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from tests.multiproc.spawn import spawn
from unetdist.infer.model_file import model_file_state
from unetdist.infer.predict import PredictOptions
from unetdist.infer.run import predict_files
from unetdist.infer.store import OutputSpec
from unetdist.model import UNet
from unetdist.parallel.env import DistEnv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # threads change the last bits

OPTIONS = PredictOptions(tile=32, overlap=8, batch_size=4)
OUTPUTS = {"five": OutputSpec(probabilities=True, instances=True, format="tiff", chunk=32),
           "huge": OutputSpec(probabilities=True, prob_dtype="uint8", instances=True, format="zarr", chunk=32),
           "stack": OutputSpec(probabilities=True, format="zarr", chunk=32, ngff="0.5")}


def _inputs(root: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    noise = lambda *shape: rng.integers(0, 3000, shape).astype(np.uint16)  # noqa: E731
    folders = {case: root / "in" / case for case in OUTPUTS}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i, shape in enumerate([(40, 50), (64, 64), (33, 90), (50, 41), (70, 30)]):
        tifffile.imwrite(folders["five"] / f"img_{i}.tif", noise(*shape))
    tifffile.imwrite(folders["huge"] / "field.ome.tif", noise(150, 300), tile=(32, 32), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    tifffile.imwrite(folders["stack"] / "movie.tif", noise(5, 40, 40), photometric="minisblack")
    return {case: [str(folder)] for case, folder in folders.items()}


def _worker(model: str, root: str) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed

    env = init_distributed()
    try:
        for case, spec in OUTPUTS.items():
            summary = predict_files(model, [str(Path(root) / "in" / case)], Path(root) / "two" / case, OPTIONS, spec,
                                    env)
            (Path(root) / "two" / f"{case}.rank{env.rank}.json").write_text(json.dumps(summary))
    finally:
        destroy_distributed()


def _read(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".tif":
        return {"0": tifffile.imread(path)}
    group = zarr.open_group(path, mode="r")
    return {name: np.asarray(group[name][:]) for name in sorted(group.array_keys())}


def test_two_ranks_write_one_store_equal_to_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    stats = {"low": [0.0], "high": [3000.0], "clipped_mean": [1500.0], "clipped_std": [800.0]}
    torch.save(model_file_state(UNet(in_channels=1, num_classes=3, base_width=4, depth=2), stats), model)
    inputs = _inputs(tmp_path)
    spawn(_worker, 2, str(model), str(tmp_path))
    alone = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    for case, spec in OUTPUTS.items():
        one = predict_files(model, inputs[case], tmp_path / "one" / case, OPTIONS, spec, alone)
        ranks = [json.loads((tmp_path / "two" / f"{case}.rank{r}.json").read_text()) for r in (0, 1)]
        written = [set(r["written"]) for r in ranks]
        assert written[0].isdisjoint(written[1]), f"{case}: an output finished by both ranks"
        outputs = sorted(p for p in (tmp_path / "two" / case).iterdir() if p.name != "predict.json")
        assert written[0] | written[1] == {str(p) for p in outputs}, f"{case}: every output finished, no work left"
        assert len(outputs) == len(one["written"])
        if case != "five":
            assert ranks[0]["files"][0]["ranks"] == [0, 1], f"{case}: both ranks predicted parts of one image"
        for path in outputs:
            mine, alone_out = _read(path), _read(tmp_path / "one" / case / path.name)
            assert mine.keys() == alone_out.keys()
            for level in mine:
                assert np.array_equal(mine[level], alone_out[level]), f"{path.name} level {level} differs"
