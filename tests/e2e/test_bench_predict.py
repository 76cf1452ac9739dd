"""`unetdist bench predict` end to end on small images: real processes, a real OME-TIFF, the JSON and the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile

from tests.conftest import PYTHON, run_cmd

pytestmark = pytest.mark.slow


def test_bench_predict_reports_speed_and_peak_rss(tmp_path: Path) -> None:
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "bench", "predict", "--sizes", "256", "384", "--ranks", "1",
                    "--tile", "128", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with tifffile.TiffFile(tmp_path / "data" / "slide_384.ome.tif") as tif:
        assert tif.pages[0].is_tiled and tif.series[0].dtype == "uint16" and tif.series[0].shape == (384, 384)
    report = json.loads((tmp_path / "out" / "bench_predict.json").read_text())
    rows = report["rows"]
    assert [(r["side"], r["ranks"]) for r in rows] == [(256, 1), (384, 1)]
    for row in rows:
        assert row["megapixels"] == pytest.approx(row["side"] ** 2 / 1e6) and row["megapixels_per_s"] > 0
        assert 100 < row["peak_rss_mb"] < 1536, "the RSS of a real Python + torch process"
    assert report["checks"]["rss_ok"] and "growth_1_ranks" in report["checks"]
    assert "peak RSS" in proc.stdout and "load average" in proc.stdout
