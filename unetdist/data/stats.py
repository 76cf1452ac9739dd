"""Per-channel intensity statistics of the training images, merged from per-frame summaries.

Frames are summarised where they are read (possibly in worker processes, see `samples`) and merged
here in a fixed order, so the statistics do not depend on the number of processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unetdist.data.samples import SAMPLE_PIXELS, intensity_summary

PERCENTILES = (0.5, 99.5)


class IntensityAccumulator:
    """Per-channel intensity statistics over whole source frames (not tiles: no overlap or padding).

    8/16-bit integer data is counted in an exact histogram; other dtypes keep a seeded random
    sample of pixels per frame for the percentiles (mean and std then come from that sample).
    Reported: percentiles 0.5/99.5 (numpy's inverted_cdf rule), mean and std of the raw pixels,
    and clipped_mean/clipped_std of the pixels clipped to the percentiles (what normalize uses).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.count = 0
        self.channels = 0
        self.exact = True
        self.dtype = ""
        self.hist: np.ndarray | None = None
        self.samples: list[list[np.ndarray]] = []

    def add(self, image: np.ndarray) -> None:
        """Count one C x H x W frame (all frames must share channels and dtype)."""
        self.add_summary(intensity_summary(image, (self.seed, self.count)))

    def add_summary(self, summary: dict[str, Any]) -> None:
        """Merge the output of `samples.intensity_summary` for one frame."""
        self.count += 1
        channels = summary["channels"]
        if not self.channels:
            self.channels, self.exact, self.dtype = len(channels), summary["exact"], summary["dtype"]
            self.samples = [[] for _ in channels]
        if self.exact:
            stacked = np.stack(channels)
            self.hist = stacked if self.hist is None else self.hist + stacked
        else:
            for c, values in enumerate(channels):
                self.samples[c].append(values)

    def result(self) -> dict[str, Any]:
        per_channel = [self._channel(c) for c in range(self.channels)]
        keys = ("low", "high", "mean", "std", "clipped_mean", "clipped_std")
        out: dict[str, Any] = {k: [ch[k] for ch in per_channel] for k in keys}
        out["percentiles"] = list(PERCENTILES)
        out["method"] = "histogram" if self.exact else f"sample of {SAMPLE_PIXELS} pixels per frame"
        return out

    def _channel(self, c: int) -> dict[str, float]:
        if self.exact:
            assert self.hist is not None
            offset = -int(np.iinfo(np.dtype(self.dtype)).min)
            values = np.arange(self.hist.shape[1], dtype=np.float64) - offset
            weights = self.hist[c].astype(np.float64)
        else:
            values = np.sort(np.concatenate(self.samples[c]))
            weights = np.ones_like(values)
        total = weights.sum()
        cum = np.cumsum(weights)
        low, high = (float(values[np.searchsorted(cum, p / 100 * total, side="left")]) for p in PERCENTILES)
        clipped = np.clip(values, low, high)
        mean, cmean = (float((v * weights).sum() / total) for v in (values, clipped))
        std = float(np.sqrt(((values - mean) ** 2 * weights).sum() / total))
        cstd = float(np.sqrt(((clipped - cmean) ** 2 * weights).sum() / total))
        return {"low": low, "high": high, "mean": mean, "std": std, "clipped_mean": cmean, "clipped_std": cstd}
