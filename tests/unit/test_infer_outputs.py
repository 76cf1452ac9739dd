"""Lazily read inputs give the labels of in-memory ones; outputs re-open in tifffile / zarr / ome-zarr with the
input's axes and pixel size; existing outputs are kept unless --overwrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from unetdist.data.errors import DataError
from unetdist.infer.model_file import model_file_state
from unetdist.infer.predict import PredictOptions
from unetdist.infer.run import predict_files
from unetdist.infer.store import OutputSpec
from unetdist.model import UNet
from unetdist.parallel.env import DistEnv

ALONE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
OPTIONS = PredictOptions(tile=32, overlap=8, batch_size=4)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model.pt"
    stats = {"low": [100.0], "high": [3000.0], "clipped_mean": [1500.0], "clipped_std": [800.0]}
    torch.save(model_file_state(UNet(in_channels=1, num_classes=3, base_width=4, depth=2), stats), path)
    return path


def _image(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.integers(0, 2500, shape) + 400 * (np.indices(shape).sum(0) % 37 > 18)).astype(np.uint16)


def _ome_zarr(path: Path, image: np.ndarray, axes: str, scale: dict[str, float], version: str) -> Path:
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(path, mode="w", zarr_format=2 if version == "0.4" else 3)
    write_image(image, group, axes=axes.lower(), fmt=fmt, scale_factors=[2], scale=scale,
                storage_options={"chunks": (1,) * (image.ndim - 2) + (32, 32)})
    return path


def _predict(model: Path, inputs: list[Path], out: Path, **spec: object) -> dict:
    return predict_files(model, [str(p) for p in inputs], out, OPTIONS, OutputSpec(chunk=32, **spec), ALONE)


def test_lazy_ome_tiff_and_ome_zarr_inputs_give_the_labels_of_in_memory_ones(tmp_path: Path, model: Path) -> None:
    image = _image((2, 150, 120))  # a z-stack: Z is kept apart from time
    np.save(tmp_path / "memory.npy", image)  # read whole by numpy, axes by the default rule (TYX)
    tifffile.imwrite(tmp_path / "tiled.ome.tif", image, tile=(32, 32), compression="zlib", ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325, "PhysicalSizeZ": 2.0})
    scale = {"z": 2.0, "y": 0.325, "x": 0.325}
    _ome_zarr(tmp_path / "v04.ome.zarr", image, "ZYX", scale, "0.4")
    _ome_zarr(tmp_path / "v05.ome.zarr", image, "ZYX", scale, "0.5")
    out = tmp_path / "out"
    summary = _predict(model, [tmp_path / n for n in ("memory.npy", "tiled.ome.tif", "v04.ome.zarr", "v05.ome.zarr")],
                       out, format="tiff", probabilities=True)
    assert [f["axes"] for f in summary["files"]] == ["TYX", "ZYX", "ZYX", "ZYX"]
    expected = {kind: tifffile.imread(out / f"memory_{kind}.tif") for kind in ("labels", "probs")}
    assert expected["probs"].shape == (2, 3, 150, 120) and expected["probs"].std() > 1e-3
    for name in ("tiled", "v04", "v05"):  # names drop .ome
        for kind in ("labels", "probs"):
            with tifffile.TiffFile(out / f"{name}_{kind}.tif") as tif:
                assert tif.series[0].axes == ("ZYX" if kind == "labels" else "CZYX"), name
                got = tif.asarray() if kind == "labels" else tif.asarray().transpose(1, 0, 2, 3)  # NGFF order
                assert np.array_equal(got, expected[kind]), f"{name} {kind}"


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_outputs_reopen_with_axes_and_pixel_size(tmp_path: Path, model: Path, ngff: str) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image = _image((3, 100, 70))
    tifffile.imwrite(tmp_path / "movie.ome.tif", image, tile=(32, 32), ome=True,
                     metadata={"axes": "TYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.5})
    spec = {"probabilities": True, "prob_dtype": "uint8", "instances": True}
    _predict(model, [tmp_path / "movie.ome.tif"], tmp_path / "tif", format="tiff", **spec)
    _predict(model, [tmp_path / "movie.ome.tif"], tmp_path / "zarr", format="zarr", ngff=ngff, **spec)
    for kind, axes, dtype in (("labels", "TYX", np.uint8), ("probs", "TCYX", np.uint8),
                              ("instances", "TYX", np.uint16)):
        with tifffile.TiffFile(tmp_path / "tif" / f"movie_{kind}.tif") as tif:
            assert tif.series[0].axes == axes and tif.series[0].dtype == dtype and tif.pages[0].is_tiled
            pixels = tif.ome_metadata.split("<Pixels ")[1]
            assert 'PhysicalSizeX="0.65"' in pixels and 'PhysicalSizeY="0.5"' in pixels
            as_tiff = tif.asarray()
        nodes = list(Reader(parse_url(tmp_path / "zarr" / f"movie_{kind}.zarr"))())
        meta = nodes[0].metadata
        assert [a["name"] for a in meta["axes"]] == list(axes.lower())
        assert meta["coordinateTransformations"][0][0]["scale"][-2:] == [0.5, 0.65]
        levels = nodes[0].data
        assert np.array_equal(np.asarray(levels[0]), as_tiff), f"{kind}: zarr and TIFF outputs agree"
        if kind != "probs":  # a label pyramid: every second pixel
            assert len(levels) == 3 and meta["coordinateTransformations"][1][0]["scale"][-2:] == [1.0, 1.3]
            assert np.array_equal(np.asarray(levels[1]), as_tiff[:, ::2, ::2])
    probs = tifffile.imread(tmp_path / "tif" / "movie_probs.tif").astype(np.int64)
    assert np.all(np.abs(probs.sum(1) - 255) <= 2), "uint8 probabilities are scaled to 0..255"


def test_existing_outputs_are_kept_without_overwrite(tmp_path: Path, model: Path) -> None:
    tifffile.imwrite(tmp_path / "fov_00.ome.tif", _image((40, 40)), ome=True)
    out = tmp_path / "out"
    _predict(model, [tmp_path / "fov_00.ome.tif"], out)
    before = (out / "fov_00_labels.tif").stat().st_mtime_ns
    with pytest.raises(DataError, match=r"fov_00_labels.tif exists; pass --overwrite"):
        _predict(model, [tmp_path / "fov_00.ome.tif"], out)
    assert (out / "fov_00_labels.tif").stat().st_mtime_ns == before
    _predict(model, [tmp_path / "fov_00.ome.tif"], out, overwrite=True, probabilities=True)
    assert sorted(p.name for p in out.iterdir()) == ["fov_00_labels.tif", "fov_00_probs.tif", "predict.json"]


def test_python_api_equals_the_command(tmp_path: Path, model: Path) -> None:
    from unetdist import load_model, predict_image

    image = _image((2, 70, 90))
    tifffile.imwrite(tmp_path / "movie.tif", image, photometric="minisblack")
    _predict(model, [tmp_path / "movie.tif"], tmp_path / "out", probabilities=True, instances=True)
    net = load_model(model, device="cpu")
    got = predict_image(net, image, tile=32, overlap=8, probabilities=True, instances=True)
    assert np.array_equal(got["labels"], tifffile.imread(tmp_path / "out" / "movie_labels.tif"))
    probs = tifffile.imread(tmp_path / "out" / "movie_probs.tif")
    # classes first here; softmax over blocks of another shape may round the last bit differently
    np.testing.assert_allclose(got["probabilities"].transpose(1, 0, 2, 3), probs, rtol=0, atol=1e-6)
    assert np.array_equal(got["instances"], tifffile.imread(tmp_path / "out" / "movie_instances.tif"))
    one = predict_image(net, image[1], tile=32, overlap=8)  # a 2-D frame alone: that frame's labels
    assert one.keys() == {"labels"} and np.array_equal(one["labels"], got["labels"][1])


def test_evaluate_checks_label_shapes_before_predicting(tmp_path: Path, model: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from unetdist.infer.__main__ import main

    tifffile.imwrite(tmp_path / "img.tif", _image((40, 50)))
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "img.tif", np.zeros((50, 40), np.uint8))  # paired by name
    rc = main(["evaluate", "--model", str(model), "--images", str(tmp_path / "img.tif"), "--labels",
               str(tmp_path / "labels" / "img.tif"), "--out", str(tmp_path / "eval")])
    assert rc == 2 and f"{tmp_path / 'labels' / 'img.tif'} is 50 x 40 but its image" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists(), "nothing predicted"


def test_evaluate_reads_zarr_predictions(tmp_path: Path, model: Path) -> None:
    from unetdist.infer.report import EvalOptions, evaluate_files

    tifffile.imwrite(tmp_path / "img.tif", _image((60, 70)))
    _predict(model, [tmp_path / "img.tif"], tmp_path / "zarr", format="zarr")
    _predict(model, [tmp_path / "img.tif"], tmp_path / "tif", format="tiff")
    labels = tmp_path / "tif" / "img_labels.tif"  # the prediction itself as the truth: everything matches
    for pred in (tmp_path / "zarr" / "img_labels.zarr", labels):
        metrics = evaluate_files([pred], [labels], tmp_path / "eval", EvalOptions(num_classes=3, overlays=0))
        assert metrics["pooled"]["iou"]["class_0"] == 1.0
        assert all(v["f1"] == 1.0 for v in metrics["pooled"]["instances_by_iou"].values())
