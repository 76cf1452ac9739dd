"""`unetdist bench shard` at small sizes: real OME-TIFFs, the real shard command, figures in JSON and table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from unetdist.bench.shard import CHUNK, synthetic_tiles, write_slide
from unetdist.cli import main
from unetdist.data.readers import open_image
from unetdist.data.tiling import tile_starts


def test_synthetic_slide_is_written_tile_by_tile_as_tiled_ome_tiff(tmp_path):
    write_slide(tmp_path / "s.ome.tif", 1100, seed=1, labels=False)
    write_slide(tmp_path / "l.ome.tif", 1100, seed=1, labels=True)
    with tifffile.TiffFile(tmp_path / "s.ome.tif") as tif:
        assert tif.is_ome and tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].tilelength == CHUNK
    with open_image(tmp_path / "s.ome.tif") as image, open_image(tmp_path / "l.ome.tif") as label:
        assert image.shape == (1100, 1100) and image.dtype == np.uint16
        assert image.pixel_size["X"] == (0.325, "micrometer")
        first = next(synthetic_tiles(1100, 1, labels=False))
        np.testing.assert_array_equal(image.array[:CHUNK, :CHUNK], first)
        lbl, img = label.array[:], image.array[:]
        assert 0 < lbl.mean() < 0.5 and img[lbl == 1].mean() > img[lbl == 0].mean() + 2000


@pytest.mark.slow
def test_bench_shard_small_sizes(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "shard", "--sizes", "600,1100", "--tile", "128", "--out", str(out),
                 "--data-dir", str(tmp_path / "data"), "--region-pixels", "200000"])
    report = json.loads((out / "bench-shard.json").read_text())
    assert report["schema"] == "unetdist.bench.shard/1" and [r["size"] for r in report["rows"]] == [600, 1100]
    for row in report["rows"]:
        assert row["train_tiles"] == len(tile_starts(row["size"], 128, 0)) ** 2
        for key in ("shard_s", "megapixels_per_s", "megapixels_per_s_after_startup", "peak_memory_gb",
                    "peak_rss_largest_process_gb"):
            assert 0 < row[key] < 1e4, key
        assert 0.05 < row["peak_memory_gb"] < 1.5
    assert code == (0 if report["goals"]["rss_under_goal"] and report["goals"]["growth_under_goal"] else 1)
    assert "peak memory" in capsys.readouterr().out
    assert not list((tmp_path / "data").glob("shards_*"))  # the shards are removed after measuring
