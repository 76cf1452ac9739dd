"""Tile-grid arithmetic shared by shard writing and sliding-window inference (cutting and stitching).

Kept pure (numpy in, numpy out, no I/O) so the grid rule lives in one place: tiles of
`tile` pixels start every `tile - overlap` pixels from the top-left corner; when the last
tile would run past the image, the image is reflect-padded at the bottom/right so that every
tile is full-sized. Tile coordinates are therefore always in original image pixels, and the
part of a tile that lies inside the original image is `valid_h x valid_w` from its top-left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile of an image: its top-left corner, the part inside the image, and the pixels."""

    y: int
    x: int
    valid_h: int
    valid_w: int
    image: np.ndarray  # C x tile x tile
    label: np.ndarray | None  # tile x tile, or None when tiling an image alone


def _check(tile: int, overlap: int) -> None:
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of `length` pixels.

    The first tile starts at 0, the next ones every `tile - overlap` pixels, and there are just
    enough of them that the last one reaches the end of the axis (possibly into the padding).
    """
    _check(tile, overlap)
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [i * stride for i in range(count)]


def padded_length(length: int, tile: int, overlap: int) -> int:
    """Length of the axis after padding so that the last tile fits entirely."""
    return tile_starts(length, tile, overlap)[-1] + tile


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """All (y, x) top-left corners, row by row."""
    return [(y, x) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def pad_to_grid(array: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Reflect-pad the last two axes at their end so that the tile grid fits.

    Reflection (not zeros) keeps padded pixels statistically like real ones, so neither the
    network nor the intensity statistics learn an artificial black border. numpy repeats the
    reflection when the pad is longer than the axis, and copies a 1-pixel axis.
    """
    height, width = array.shape[-2:]
    pad_h = padded_length(height, tile, overlap) - height
    pad_w = padded_length(width, tile, overlap) - width
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, widths, mode="reflect")


def iter_tiles(image: np.ndarray, label: np.ndarray | None, tile: int, overlap: int) -> Iterator[Tile]:
    """Cut a C x H x W image (and its H x W label) into full-sized tiles, row by row."""
    if image.ndim != 3:
        raise ValueError(f"iter_tiles expects a C x H x W image, got shape {image.shape}")
    height, width = image.shape[-2:]
    if label is not None and label.shape != (height, width):
        raise ValueError(f"label shape {label.shape} does not match image H x W {(height, width)}")
    padded = pad_to_grid(image, tile, overlap)
    padded_label = None if label is None else pad_to_grid(label, tile, overlap)
    for y, x in tile_grid(height, width, tile, overlap):
        yield Tile(
            y=y,
            x=x,
            valid_h=min(tile, height - y),
            valid_w=min(tile, width - x),
            image=np.ascontiguousarray(padded[:, y : y + tile, x : x + tile]),
            label=None if padded_label is None else np.ascontiguousarray(padded_label[y : y + tile, x : x + tile]),
        )


def untile(tiles: Iterable[tuple[int, int, np.ndarray]], height: int, width: int, tile: int,
           overlap: int) -> np.ndarray:
    """Stitch (y, x, array) tiles of the grid back into a ... x height x width array (the inverse of iter_tiles).

    Where tiles overlap, each pixel comes from the tile whose centre is nearest: a tile gives up
    `overlap // 2` pixels on each side that has a neighbour (the first tile along an axis keeps its
    start, the last one its end), so seams fall in the middle of the overlaps and every pixel of
    the image is written exactly once. Pixels of the reflect padding are dropped.
    """
    _check(tile, overlap)
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out: np.ndarray | None = None
    for y, x, array in tiles:
        if out is None:
            out = np.zeros(array.shape[:-2] + (height, width), array.dtype)
        (y0, y1), (x0, x1) = (_kept(y, ys, tile, overlap, height), _kept(x, xs, tile, overlap, width))
        out[..., y0:y1, x0:x1] = array[..., y0 - y : y1 - y, x0 - x : x1 - x]
    if out is None:
        raise ValueError("untile needs at least one tile")
    return out


def _kept(start: int, starts: list[int], tile: int, overlap: int, length: int) -> tuple[int, int]:
    """The image interval a tile starting at `start` contributes along one axis."""
    if start not in starts:
        raise ValueError(f"{start} is not a tile start of the grid {starts}")
    first = start if start == starts[0] else start + overlap // 2
    last = start + tile if start == starts[-1] else start + tile - (overlap - overlap // 2)
    return first, min(last, length)


@dataclass(frozen=True)
class Band:
    """A run of tile rows cut from one read of image rows, so a large image is tiled in bounded memory.

    `starts` are the tile rows' y offsets; rows [top, bottom) are read (the tiles plus `halo` rows on
    each side, for label conversion and weight maps near the cut, and enough rows for the padding);
    rows [own_top, own_bottom) are this band's share of the image, so that counting them in every
    band counts each row once.
    """

    starts: tuple[int, ...]
    top: int
    bottom: int
    own_top: int
    own_bottom: int


def bands(height: int, width: int, tile: int, overlap: int, region_pixels: int, halo: int) -> list[Band]:
    """Tile rows grouped into bands of about `region_pixels` pixels (at least one tile row each).

    The band that reaches the bottom reads at least `tile` rows, so that its reflect padding sees
    the same rows as padding the whole image would (the padding is shorter than a tile).
    """
    starts = tile_starts(height, tile, overlap)
    stride = tile - overlap
    rows_per_band = max(1, (max(region_pixels // max(width, 1), tile) - tile) // stride + 1)
    out = []
    for first in range(0, len(starts), rows_per_band):
        group = tuple(starts[first : first + rows_per_band])
        following = first + rows_per_band
        own_bottom = starts[following] if following < len(starts) else height
        bottom = min(height, group[-1] + tile + halo)
        top = group[0] - halo if bottom < height else min(group[0] - halo, height - tile)
        out.append(Band(starts=group, top=max(0, top), bottom=bottom, own_top=group[0] if first else 0,
                        own_bottom=own_bottom))
    return out


def iter_band_tiles(image: np.ndarray, label: np.ndarray | None, band: Band, height: int, width: int, tile: int,
                    overlap: int) -> Iterator[Tile]:
    """The tiles of one band, from its rows [band.top, band.bottom) (C x rows x W, and rows x W).

    Gives the same tiles as `iter_tiles` on the whole image: the band is padded like the image
    (reflection at the right, and at the bottom when the band reaches it).
    """
    pad_h = padded_length(height, tile, overlap) - height if band.bottom == height else 0
    pad_w = padded_length(width, tile, overlap) - width
    widths = [(0, pad_h), (0, pad_w)]
    padded = np.pad(image, [(0, 0)] * (image.ndim - 2) + widths, mode="reflect") if pad_h or pad_w else image
    padded_label = None
    if label is not None:
        padded_label = np.pad(label, widths, mode="reflect") if pad_h or pad_w else label
    for y in band.starts:
        r = y - band.top
        for x in tile_starts(width, tile, overlap):
            yield Tile(y=y, x=x, valid_h=min(tile, height - y), valid_w=min(tile, width - x),
                       image=np.ascontiguousarray(padded[..., r : r + tile, x : x + tile]),
                       label=None if padded_label is None else np.ascontiguousarray(
                           padded_label[r : r + tile, x : x + tile]))
