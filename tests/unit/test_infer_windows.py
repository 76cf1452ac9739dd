"""Window placement and blending weights: flush edges, minimum overlap, pooling alignment, coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unetdist.infer.windows import (Window, check_tiling, default_margin, gaussian_map, split_rows, window_grid,
                                    window_starts, window_weight)


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "align", "expected"),
    [
        (700, 256, 64, 2, [0, 148, 296, 444]),
        (1100, 256, 64, 2, [0, 168, 338, 506, 676, 844]),
        (1100, 256, 64, 16, [0, 176, 336, 512, 672, 844]),
        (256, 256, 64, 1, [0]),
        (100, 256, 64, 16, [0]),
        (257, 256, 0, 1, [0, 1]),
        (512, 256, 0, 1, [0, 256]),
    ],
)
def test_window_starts_known_values(length: int, tile: int, overlap: int, align: int, expected: list[int]) -> None:
    assert window_starts(length, tile, overlap, align) == expected


def test_window_starts_properties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3000):
        tile = int(rng.integers(1, 300))
        overlap = int(rng.integers(0, tile))
        length = int(rng.integers(1, 2000))
        align = int(rng.choice([1, 2, 4, 16]))
        starts = window_starts(length, tile, overlap, align)
        size = min(tile, length)
        assert starts[0] == 0 and starts[-1] + size == length, "first and last windows flush with the edges"
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(0 < g <= tile - overlap for g in gaps), "neighbours overlap by at least `overlap`"
        if tile - overlap >= 2 * align:
            assert all(s % align == 0 for s in starts[:-1]), "interior starts on the pooling grid"
        if align == 1 and length > tile:
            assert len(starts) == math.ceil((length - tile) / (tile - overlap)) + 1, "fewest windows"


def test_grid_rows_and_bands() -> None:
    grid = window_grid(700, 1100, 256, 64, 2)
    assert (grid.rows, len(grid)) == (4, 24) and (grid.h, grid.w) == (256, 256)
    assert grid.band((0, 4)) == (0, 700) and grid.band((1, 3)) == (148, 552)
    assert [w.y for w in grid.windows((2, 3))] == [296] * 6
    small = window_grid(37, 53, 256, 64)
    assert (small.rows, len(small), small.h, small.w) == (1, 1, 37, 53)
    with pytest.raises(ValueError):
        grid.band((3, 5))


@pytest.mark.parametrize(("rows", "parts"), [(4, 2), (5, 2), (3, 8), (10, 3), (1, 4)])
def test_split_rows_partitions(rows: int, parts: int) -> None:
    ranges = split_rows(rows, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows and len(ranges) == min(rows, parts)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))


def test_gaussian_map_is_nnunet_style() -> None:
    g = gaussian_map(33, 64)
    assert g.dtype == np.float32 and g.shape == (33, 64)
    assert g.max() == pytest.approx(1.0) and g[16, 31] == g[16, 32] == g.max()
    np.testing.assert_allclose(g, g[::-1, ::-1], rtol=1e-6)
    sigma = 33 / 8  # sigma = tile / 8 along each axis
    np.testing.assert_allclose(g[16 + 4, 31] / g[16, 31], math.exp(-16 / (2 * sigma**2)), rtol=1e-5)
    assert g.min() > 0


def test_margin_zeroes_inner_edges_only() -> None:
    grid = window_grid(300, 300, 128, 32)
    corner = Window(0, 0, 128, 128)
    w = window_weight(corner, grid.height, grid.width, "constant", 8)
    assert w[:, -8:].max() == 0 and w[-8:, :].max() == 0, "inner edges discarded"
    assert w[:120, :120].min() == 1, "image edges kept"
    middle = window_weight(Window(86, 86, 128, 128), 300, 300, "gaussian", 8)
    assert middle[:8].max() == middle[-8:].max() == middle[:, :8].max() == middle[:, -8:].max() == 0


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_every_pixel_keeps_weight_up_to_half_the_overlap(blend: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(40):
        tile = int(rng.integers(16, 96))
        overlap = int(rng.integers(0, tile // 2))
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        margin = overlap // 2
        grid = window_grid(height, width, tile, overlap, 4)
        total = np.zeros((height, width))
        for window in grid.windows():
            total[window.slices] += window_weight(window, height, width, blend, margin)
        assert total.min() > 0, (height, width, tile, overlap)


def test_check_tiling_rejects_bad_values() -> None:
    check_tiling(256, 64, 32)
    for tile, overlap, margin in ((0, 0, 0), (64, 64, 0), (64, -1, 0), (256, 64, 33), (256, 64, -1)):
        with pytest.raises(ValueError):
            check_tiling(tile, overlap, margin)
    assert default_margin(64) == 16
