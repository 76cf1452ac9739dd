"""Tile-grid arithmetic: coverage, overlap, reflect padding, odd and tiny sizes."""

from __future__ import annotations

import numpy as np
import pytest

from unetdist.data.tiling import iter_tiles, pad_to_grid, padded_length, tile_grid, tile_starts


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (256, 128, 0, [0, 128]),
        (257, 128, 0, [0, 128, 256]),
        (100, 128, 0, [0]),
        (128, 128, 0, [0]),
        (256, 128, 32, [0, 96, 192]),
        (37, 16, 5, [0, 11, 22]),
    ],
)
def test_tile_starts_known_values(length: int, tile: int, overlap: int, expected: list[int]) -> None:
    assert tile_starts(length, tile, overlap) == expected


def test_tile_starts_cover_minimally() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        tile = int(rng.integers(1, 40))
        overlap = int(rng.integers(0, tile))
        length = int(rng.integers(1, 200))
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0
        assert all(b - a == tile - overlap for a, b in zip(starts, starts[1:]))
        assert starts[-1] + tile >= length  # covers the axis
        if len(starts) > 1:
            assert starts[-2] + tile < length  # one tile fewer would not
            assert starts[-1] < length  # no tile entirely in the padding
        assert padded_length(length, tile, overlap) == starts[-1] + tile


def test_overlap_is_shared_between_neighbours() -> None:
    image = np.arange(40 * 40, dtype=np.uint16).reshape(1, 40, 40)
    tiles = {(t.y, t.x): t for t in iter_tiles(image, None, 16, 6)}
    left, right = tiles[(0, 0)], tiles[(0, 10)]
    np.testing.assert_array_equal(left.image[:, :, 10:], right.image[:, :, :6])


def test_invalid_overlap_raises() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 16, 16)
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 16, -1)


def test_reflect_padding_mirrors_without_repeating_the_edge() -> None:
    image = np.arange(2 * 21 * 19, dtype=np.int32).reshape(2, 21, 19)
    padded = pad_to_grid(image, 16, 0)
    assert padded.shape == (2, 32, 32)
    np.testing.assert_array_equal(padded[:, :21, :19], image)
    for i in range(1, 11):  # reflect: row 21 + k - 1 mirrors row 21 - k - 1
        np.testing.assert_array_equal(padded[:, 20 + i, :19], image[:, 20 - i, :])
    np.testing.assert_array_equal(padded[:, :21, 19], image[:, :, 17])


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), [(37, 53, 16, 5), (16, 16, 16, 0), (33, 17, 8, 3)])
def test_tiles_reassemble_the_image(height: int, width: int, tile: int, overlap: int) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 65536, (2, height, width), dtype=np.uint16)
    label = rng.integers(0, 3, (height, width), dtype=np.uint8)
    rebuilt = np.zeros_like(image)
    rebuilt_label = np.zeros_like(label)
    seen = np.zeros((height, width), bool)
    tiles = list(iter_tiles(image, label, tile, overlap))
    assert [(t.y, t.x) for t in tiles] == tile_grid(height, width, tile, overlap)
    for t in tiles:
        assert t.image.shape == (2, tile, tile) and t.label.shape == (tile, tile)
        assert t.image.dtype == np.uint16 and t.image.flags.c_contiguous
        assert (t.valid_h, t.valid_w) == (min(tile, height - t.y), min(tile, width - t.x))
        rebuilt[:, t.y : t.y + t.valid_h, t.x : t.x + t.valid_w] = t.image[:, : t.valid_h, : t.valid_w]
        rebuilt_label[t.y : t.y + t.valid_h, t.x : t.x + t.valid_w] = t.label[: t.valid_h, : t.valid_w]
        seen[t.y : t.y + t.valid_h, t.x : t.x + t.valid_w] = True
    assert seen.all()
    np.testing.assert_array_equal(rebuilt, image)
    np.testing.assert_array_equal(rebuilt_label, label)


def test_image_smaller_than_tile_is_reflected_repeatedly() -> None:
    image = np.array([[[1, 2, 3]]], dtype=np.uint16)  # 1 x 1 x 3
    (tile,) = iter_tiles(image, np.zeros((1, 3), np.uint8), 8, 0)
    assert (tile.valid_h, tile.valid_w) == (1, 3)
    np.testing.assert_array_equal(tile.image[0, 0], [1, 2, 3, 2, 1, 2, 3, 2])
    np.testing.assert_array_equal(tile.image[0, 5], tile.image[0, 0])  # a 1-pixel axis is copied


def test_label_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="label shape"):
        list(iter_tiles(np.zeros((1, 10, 10)), np.zeros((10, 9)), 8, 0))


def test_untile_inverts_iter_tiles_writing_every_pixel_once() -> None:
    from unetdist.data.tiling import untile

    rng = np.random.default_rng(5)
    for _ in range(60):
        tile = int(rng.integers(2, 24))
        overlap = int(rng.integers(0, tile))
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        image = rng.integers(0, 65536, (2, height, width), dtype=np.uint16)
        tiles = list(iter_tiles(image, None, tile, overlap))
        np.testing.assert_array_equal(untile(((t.y, t.x, t.image) for t in tiles), height, width, tile, overlap), image)
        counts = untile(((t.y, t.x, np.ones((tile, tile), np.int64)) for t in tiles), height, width, tile, overlap)
        written = np.zeros((height, width), np.int64)  # count writes: untile assigns, so sum separately
        for t in tiles:
            written += untile([(t.y, t.x, np.ones((tile, tile), np.int64))], height, width, tile, overlap)
        assert counts.min() == 1 and np.array_equal(written, np.ones((height, width), np.int64))
