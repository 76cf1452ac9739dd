"""open_image on files written by each format's own library: regions, axes, pixel size, pyramid levels."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile
import zarr

from unetdist.data.errors import DataError
from unetdist.data.readers import AxesView, open_image


def _pixels(shape, seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "zstd", "jpeg2000"])
def test_compressed_tiff_regions(tmp_path, compression):
    data = _pixels((300, 500))
    path = tmp_path / f"img_{compression}.tif"
    tifffile.imwrite(path, data, compression=compression, rowsperstrip=32)
    with open_image(path) as source:
        assert (source.axes, source.shape, source.dtype) == ("YX", (300, 500), np.uint16)
        np.testing.assert_array_equal(source.array[10:250, 20:390], data[10:250, 20:390])
        if compression is None:
            assert isinstance(source.array, np.memmap)  # contiguous: mapped, nothing read up front
        else:
            assert isinstance(source.array, zarr.Array)
            assert source.array.chunks == (32, 500)  # untiled: read in row bands of one strip


def test_ome_tiff_5d_axes_pixel_size_and_explicit_axes(tmp_path):
    data = _pixels((2, 3, 4, 96, 80))
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, data, tile=(32, 32), compression="zlib",
                     metadata={"axes": "TCZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 2.0})
    with open_image(path) as source:
        assert source.axes == "TCZYX" and source.shape == data.shape
        assert source.pixel_size == {"X": (0.5, "micrometer"), "Y": (0.25, "micrometer"), "Z": (2.0, "micrometer")}
        np.testing.assert_array_equal(source.array[1, 2, 3, 7:60, 5:70], data[1, 2, 3, 7:60, 5:70])
    with open_image(path, axes="TZCYX") as source:  # the user names the storage order: taken as said
        assert source.axes == "TZCYX" and source.shape == data.shape


def test_channel_last_rgb_is_presented_channel_first_lazily(tmp_path):
    data = _pixels((100, 120, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb", tile=(32, 32))
    with open_image(path) as source:
        assert source.axes == "CYX" and source.shape == (3, 100, 120)
        assert isinstance(source.array, AxesView)
        np.testing.assert_array_equal(source.array[1:, 5:40, 7:90], data[5:40, 7:90, 1:].transpose(2, 0, 1))
        np.testing.assert_array_equal(source.array[2, 3], data[3, :, 2])


def test_pyramidal_ome_tiff_levels(tmp_path):
    data = _pixels((512, 384))
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, tile=(128, 128), subifds=2, compression="zlib",
                  metadata={"axes": "YX", "PhysicalSizeX": 300, "PhysicalSizeXUnit": "nm"})
        for step in (2, 4):
            tif.write(data[::step, ::step], tile=(128, 128), subfiletype=1, compression="zlib")
    with open_image(path) as source:
        assert [tuple(level.shape) for level in source.levels] == [(512, 384), (256, 192), (128, 96)]
        np.testing.assert_array_equal(source.levels[2][:], data[::4, ::4])
        assert source.pixel_size == {"X": (300.0, "nanometer")}


def test_imagej_hyperstack_axes_and_spacing(tmp_path):
    data = _pixels((2, 3, 2, 40, 50))
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "TZCYX", "unit": "um", "spacing": 1.5})
    with open_image(path) as source:
        assert source.axes == "TZCYX" and source.shape == data.shape
        assert source.pixel_size == {"X": (0.25, "micrometer"), "Y": (0.25, "micrometer"), "Z": (1.5, "micrometer")}
        np.testing.assert_array_equal(source.array[1, 2, 1], data[1, 2, 1])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_written_by_ome_zarr(tmp_path, version):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    data = _pixels((2, 3, 128, 96))
    path = tmp_path / "img.ome.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=fmt.zarr_format)
    write_image(data, root, axes="czyx", fmt=fmt, storage_options={"chunks": (1, 1, 32, 32)}, scale_factors=(2,),
                scale={"c": 1.0, "z": 2.0, "y": 0.4, "x": 0.4}, axes_units={a: "micrometer" for a in "zyx"})
    with open_image(path) as source:
        assert source.axes == "CZYX" and source.shape == data.shape
        assert source.pixel_size == {"Z": (2.0, "micrometer"), "Y": (0.4, "micrometer"), "X": (0.4, "micrometer")}
        assert [tuple(level.shape) for level in source.levels] == [(2, 3, 128, 96), (2, 3, 64, 48)]
        np.testing.assert_array_equal(source.array[1, 2, 10:100, 33:90], data[1, 2, 10:100, 33:90])


def test_czi_written_by_pylibczirw(tmp_path):
    pyczi = pytest.importorskip("pylibCZIrw.czi")
    data = _pixels((2, 3, 100, 130))  # Z C Y X
    path = tmp_path / "scan.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for z in range(2):
            for c in range(3):
                czi.write(data=data[z, c], plane={"Z": z, "C": c, "T": 0}, location=(0, 0))
        czi.write_metadata(document_name="test", scale_x=0.3e-6, scale_y=0.3e-6, scale_z=1.5e-6)
    with open_image(path) as source:
        assert source.axes == "ZCYX" and source.shape == data.shape and source.dtype == np.uint16
        assert source.pixel_size["X"][0] == pytest.approx(0.3) and source.pixel_size["Z"][0] == pytest.approx(1.5)
        np.testing.assert_array_equal(source.array[1, 2, 10:50, 30:90], data[1, 2, 10:50, 30:90])
        np.testing.assert_array_equal(source.array[:, 1, 5:7], data[:, 1, 5:7])


@pytest.mark.parametrize("suffix, module", [(".nd2", "nd2"), (".czi", "pylibCZIrw")])
def test_missing_extra_names_it(tmp_path, monkeypatch, suffix, module):
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, module, None)  # as if the optional reader were not installed
    with pytest.raises(DataError, match=r"scan\.(nd2|czi).*unetdist\[formats\]"):
        open_image(path)


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.jpg'"):
        (tmp_path / "a.jpg").write_bytes(b"x")
        open_image(tmp_path / "a.jpg")
    path = tmp_path / "qq.tif"
    tifffile.imwrite(path, _pixels((2, 3, 16, 16)), photometric="minisblack", metadata={"axes": "QIYX"})
    with pytest.raises(DataError, match="qq.tif.*--axes"):
        open_image(path)
    with pytest.raises(DataError, match="do not fit"):
        open_image(path, axes="CYX")


def test_frame_view_reads_one_frame_lazily(tmp_path):
    from unetdist.data import regions

    data = _pixels((2, 3, 2, 40, 36))  # T Z C Y X
    path = tmp_path / "movie.ome.tif"
    tifffile.imwrite(path, data, tile=(16, 16), compression="zlib", metadata={"axes": "TZCYX"})
    with open_image(path) as source:
        layout = regions.image_layout(source)
        assert (layout.frames, layout.channels, layout.frame_axes) == (6, 2, "TZ")
        view = regions.frame_view(source, layout, 5)  # t = 1, z = 2
        assert view.shape == (2, 40, 36)
        np.testing.assert_array_equal(view[:, 3:30, 5:9], data[1, 2, :, 3:30, 5:9])
        np.testing.assert_array_equal(np.asarray(view), data[1, 2])
        np.testing.assert_array_equal(regions.read_rows(source, layout, 5, 10, 20), data[1, 2, :, 10:20])
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, data[0, 0, 0], compression="lzw")
    with open_image(gray) as source:
        view = regions.frame_view(source, regions.image_layout(source), 0)
        assert view.shape == (1, 40, 36)
        np.testing.assert_array_equal(view[0, 2:5], data[0, 0, 0, 2:5])
        np.testing.assert_array_equal(view[:, 2:5, 1:3], data[0, 0, 0, None, 2:5, 1:3])
