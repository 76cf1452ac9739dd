"""Sliding-window prediction of one frame of any size, blended into seamless logits.

Why this module exists: whole fields of view are far larger than a training tile and than what
one forward pass can hold, so a frame is cut into windows (`windows.py`), predicted in batches
and blended back. A frame can also be predicted in bands of window rows, so that several ranks
share one huge image: `accumulate` returns the weighted sums of a band, and sums of bands add up
to the sums of the whole frame (`finalize` divides).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import torch

from unetdist.config import UsageError
from unetdist.data.normalize import IntensityStats, Normalization, normalize, unusual_intensity
from unetdist.infer.windows import (BLENDS, Window, WindowGrid, check_tiling, default_margin, edge_weight, inner_edges,
                                   window_grid)
from unetdist.model import UNet
from unetdist.parallel.precision import resolve_inference_precision

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class PredictOptions:
    """How windows are placed, blended and run.

    Attributes:
        tile: window size in pixels.
        overlap: minimum overlap of neighbouring windows.
        margin: pixels discarded at a window's inner edges (None: `default_margin(overlap)`).
        blend: ``gaussian`` (sigma = tile / 8) or ``constant`` (plain averaging).
        batch_size: windows per forward pass.
        precision: ``auto`` (bf16 on GPUs with bf16 hardware, else fp32), ``fp32`` or ``bf16``.
        tta: average the logits of the 4 flips (none, horizontal, vertical, both).
    """

    tile: int = 256
    overlap: int = 64
    margin: int | None = None
    blend: str = "gaussian"
    batch_size: int = 4
    precision: str = "auto"
    tta: bool = False

    @property
    def resolved_margin(self) -> int:
        return default_margin(self.overlap) if self.margin is None else self.margin

    def validate(self) -> None:
        """Options come from the command line: a bad value is the user's to fix (`UsageError`, exit 2)."""
        try:
            check_tiling(self.tile, self.overlap, self.resolved_margin)
        except ValueError as exc:
            raise UsageError(f"--tile {self.tile} / --overlap {self.overlap} / --margin: {exc}") from exc
        if self.blend not in BLENDS:
            raise UsageError(f"unknown --blend {self.blend!r}; expected one of {', '.join(BLENDS)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class Band:
    """Weighted logit sums of image rows [y0, y1) and columns [x0, x0 + width): `acc` is K x rows x width,
    `weight` rows x width (CPU float32)."""

    y0: int
    y1: int
    acc: torch.Tensor
    weight: torch.Tensor
    x0: int = 0


class _Columns:
    """Columns [x0, x1) of a C x H x W frame, sliced lazily like the frame (`view[:, a:b]` reads only that)."""

    def __init__(self, frame: Any, x0: int, x1: int) -> None:
        self.frame, self.x0, self.x1 = frame, x0, x1
        self.shape = (*frame.shape[:-1], x1 - x0)

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.frame[(*key, slice(self.x0, self.x1))])


class SlidingWindowPredictor:
    """Runs a UNet over windows of a frame on one device.

    Args:
        model: the UNet (put in eval mode and moved to `device` here).
        norm: the training normalisation (`unetdist.data.normalize`), applied to the raw pixels of each
            window's band; in percentile mode with the percentiles of the whole frame. Dataset
            statistics alone mean the ``dataset`` mode.
        options: see `PredictOptions`.
        device: where the model runs; blending happens on the CPU.
    """

    def __init__(self, model: UNet, norm: Normalization | IntensityStats, options: PredictOptions,
                 device: torch.device) -> None:
        options.validate()
        self.model = model.eval().to(device)
        self.norm = norm if isinstance(norm, Normalization) else Normalization("dataset", norm)
        self.options, self.device = options, device
        self.num_classes = int(model.hparams["num_classes"])
        self.align = 2 ** int(model.hparams["depth"])
        self.min_side = self.align * (2 if model.hparams["norm"] == "instance" else 1)
        self.amp_dtype = resolve_inference_precision(options.precision, device)  # auto: bf16 only where native
        self._weights: dict[tuple, torch.Tensor] = {}
        self._bounds: tuple[Any, np.ndarray | None] | None = None  # (frame, its percentiles): see frame_bounds

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """Frames smaller than the model's minimum input are reflect-padded at the bottom/right to it."""
        return max(height, self.min_side), max(width, self.min_side)

    def grid(self, height: int, width: int) -> WindowGrid:
        """The windows of a `height` x `width` frame (in padded coordinates)."""
        o = self.options
        return window_grid(*self.padded_size(height, width), o.tile, o.overlap, self.align)

    def predict(self, frame: np.ndarray, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Blended float32 logits (K x H x W, CPU) of one C x H x W frame of raw pixels."""
        height, width = frame.shape[-2:]
        band = self.accumulate(frame, None, progress)
        return self.finalize(band.acc, band.weight, height, width)

    def accumulate(self, frame: Any, rows: tuple[int, int] | None = None,
                   progress: Callable[[int], None] | None = None, cols: tuple[int, int] | None = None) -> Band:
        """Weighted sums over the windows of window rows `rows` and columns `cols` (all by default) of a C x H x W
        frame, reading only the pixels those windows cover."""
        height, width = frame.shape[-2:]
        grid = self.grid(height, width)
        rows, cols = rows or (0, grid.rows), cols or (0, len(grid.xs))
        (y0, y1), (x0, x1) = grid.band(rows), grid.columns(cols)
        image = self._normalized(_Columns(frame, x0, min(x1, width)), y0, y1, x1 - x0, self.frame_bounds(frame))
        acc = torch.zeros(self.num_classes, y1 - y0, x1 - x0)
        weight = torch.zeros(y1 - y0, x1 - x0)
        windows = grid.windows(rows, cols)
        for start in range(0, len(windows), self.options.batch_size):
            batch = windows[start:start + self.options.batch_size]
            tiles = np.stack([image[:, w.y - y0:w.y - y0 + w.h, w.x - x0:w.x - x0 + w.w] for w in batch])
            logits = self._forward(torch.from_numpy(tiles))
            for window, out in zip(batch, logits):
                wmap = self._weight(window, grid)
                ys = slice(window.y - y0, window.y - y0 + window.h)
                xs = slice(window.x - x0, window.x - x0 + window.w)
                acc[:, ys, xs] += out * wmap
                weight[ys, xs] += wmap
            if progress is not None:
                progress(len(batch))
        return Band(y0, y1, acc, weight, x0)

    def frame_bounds(self, frame: Any) -> np.ndarray | None:
        """The whole frame's percentiles for percentile normalisation, computed once per frame object.

        A streamed frame is normalised band by band and column block by column block; every band must
        use the same values, those of the whole frame (sampled regions above a size, so the cost does
        not grow with the frame).
        """
        if self._bounds is None or self._bounds[0] is not frame:
            self._bounds = (frame, self.norm.bounds(frame))
        return self._bounds[1]

    def finalize(self, acc: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Logits = acc / weight, cropped to the frame's `height` x `width`."""
        if not bool((weight > 0).all()):
            raise RuntimeError("internal error: some pixels got no window weight (window arithmetic)")
        return (acc / weight)[:, :height, :width].contiguous()

    def _weight(self, window: Window, grid: WindowGrid) -> torch.Tensor:
        key = (window.h, window.w, inner_edges(window, grid.height, grid.width))
        if key not in self._weights:
            o = self.options
            self._weights[key] = torch.from_numpy(edge_weight(*key[:2], o.blend, o.resolved_margin, key[2]).copy())
        return self._weights[key]

    def _normalized(self, frame: Any, y0: int, y1: int, padded_width: int, bounds: np.ndarray | None) -> np.ndarray:
        """float32 normalised rows [y0, y1) of the frame, reflect-padded to `padded_width` if the frame is smaller.

        `bounds` are the whole frame's percentiles (percentile mode), never the band's or the column block's.
        """
        height, width = frame.shape[-2:]
        part = normalize(frame[:, y0:min(y1, height)], self.norm, bounds)
        pad_h, pad_w = (y1 - y0) - part.shape[-2], padded_width - width
        if pad_h or pad_w:
            part = np.pad(part, [(0, 0), (0, pad_h), (0, pad_w)], mode="reflect")
        return part

    @torch.inference_mode()
    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """float32 CPU logits of a batch; with TTA the mean over the 4 flips."""
        x = tiles.to(self.device, non_blocking=True)
        flips: list[tuple[int, ...]] = [(), (-1,), (-2,), (-2, -1)] if self.options.tta else [()]
        total = None
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            for dims in flips:
                out = self.model(x.flip(dims) if dims else x).float()
                out = out.flip(dims) if dims else out
                total = out if total is None else total + out
        assert total is not None
        return (total / len(flips)).cpu()


def warn_unusual_intensity(path: Path, frames: Iterable[np.ndarray], norm: Normalization | IntensityStats,
                           trained_dtype: str = "") -> bool:
    """Log one warning naming `path` when one of its C x H x W frames is far from the model's training
    intensities (see `unetdist.data.normalize.unusual_intensity`); True if it warned."""
    norm = norm if isinstance(norm, Normalization) else Normalization("dataset", norm)
    for t, frame in enumerate(frames):
        problem = unusual_intensity(frame, norm, trained_dtype)
        if problem:
            log.warning("%s%s: %s", path, f" (frame {t})" if t else "", problem)
            return True
    return False
