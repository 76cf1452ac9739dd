"""Synthetic fluorescence-microscopy nuclei: the embedded default dataset.

It exists so that a fresh checkout can train and test with no download. The images imitate
a widefield nuclear stain: elliptical, slightly irregular nuclei of varied size and brightness,
some touching (the case a U-Net boundary class is for), an uneven background, optical blur
(Gaussian PSF) and camera noise (Poisson shot noise, gain, offset, Gaussian read noise), stored
as 16-bit TIFF. Everything is numpy-only and derived from (seed, image index), so image i is
the same whatever the number of images asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from unetdist.config import SynthConfig
from unetdist.data.progress import track

log = logging.getLogger(__name__)

NUCLEI_PER_PIXEL = 4.0e-4  # about 26 nuclei in 256 x 256
RADIUS_RANGE = (6.0, 14.0)  # mean semi-axis, pixels
TOUCH_PROBABILITY = 0.4  # chance that a new nucleus is placed against an existing one


@dataclass(frozen=True)
class Nucleus:
    """An irregular ellipse: centre, semi-axes, angle, radial harmonics and brightness (photons)."""

    cy: float
    cx: float
    a: float
    b: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase)
    brightness: float

    @property
    def radius(self) -> float:
        return 0.5 * (self.a + self.b)


def generate_dataset(out_dir: Path, synth: SynthConfig, progress: bool = True) -> list[tuple[Path, Path]]:
    """Write `synth.images` pairs img_XXXX.tif (uint16) / lbl_XXXX.tif (uint8) and return them.

    Labels are 0 background / 1 nucleus, or with `synth.boundary` 0 background / 1 boundary /
    2 interior, where the boundary is every nucleus pixel touching another nucleus or the
    background, so that touching nuclei are separated by boundary pixels. `progress`: report how far
    it is (a bar in a terminal, log lines otherwise).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in track(range(synth.images), synth.images, "synth", "image", enabled=progress):
        image, instances = synth_image(synth.seed, index, synth.height, synth.width)
        label = instances_to_labels(instances, synth.boundary)
        image_path, label_path = out_dir / f"img_{index:04d}.tif", out_dir / f"lbl_{index:04d}.tif"
        tifffile.imwrite(image_path, image, photometric="minisblack")
        tifffile.imwrite(label_path, label, photometric="minisblack")
        pairs.append((image_path, label_path))
    log.info("wrote %d synthetic image/label pairs to %s", synth.images, out_dir)
    return pairs


def synth_image(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint16 H x W) and its nucleus instance map (int32, 0 = background)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, index]))
    nuclei = place_nuclei(rng, height, width)
    instances, signal = rasterize(nuclei, height, width)
    texture = 1.0 + 0.15 * _standardize(gaussian_blur(rng.standard_normal((height, width)), 1.5))
    background = rng.uniform(40.0, 120.0) * (0.5 + smooth_field(rng, height, width))
    photons = gaussian_blur(background + signal * texture, rng.uniform(1.0, 1.8))
    gain, offset, read_noise = 3.0, 400.0, 6.0
    counts = rng.poisson(np.clip(photons, 0.0, None))
    adu = offset + gain * counts + rng.normal(0.0, read_noise, (height, width))
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16), instances


def place_nuclei(rng: np.random.Generator, height: int, width: int) -> list[Nucleus]:
    """Random nuclei: some placed apart (rejecting overlaps), some against a previous one."""
    target = max(2, int(round(NUCLEI_PER_PIXEL * height * width)))
    nuclei: list[Nucleus] = []
    for _ in range(target):
        shape = _random_shape(rng)
        centre = None
        if nuclei and rng.random() < TOUCH_PROBABILITY:
            centre = _touching_centre(rng, nuclei, shape, height, width)
        if centre is None:
            centre = _free_centre(rng, nuclei, shape, height, width)
        if centre is not None:
            nuclei.append(Nucleus(cy=centre[0], cx=centre[1], **shape))
    return nuclei


def _random_shape(rng: np.random.Generator) -> dict[str, Any]:
    radius = rng.uniform(*RADIUS_RANGE)
    aspect = rng.uniform(0.65, 1.0)
    harmonics = tuple((order, rng.uniform(0.0, 0.07), rng.uniform(0, 2 * np.pi)) for order in (2, 3, 5))
    return dict(
        a=radius / np.sqrt(aspect),
        b=radius * np.sqrt(aspect),
        angle=rng.uniform(0, np.pi),
        harmonics=harmonics,
        brightness=rng.uniform(250.0, 1500.0),
    )


def _touching_centre(rng: np.random.Generator, nuclei: list[Nucleus], shape: dict[str, Any], height: int,
                     width: int) -> tuple[float, float] | None:
    """A centre at about the sum of radii from a random existing nucleus (slight overlap)."""
    other = nuclei[rng.integers(len(nuclei))]
    radius = 0.5 * (shape["a"] + shape["b"])
    direction = rng.uniform(0, 2 * np.pi)
    distance = 0.85 * (radius + other.radius)
    cy, cx = other.cy + distance * np.sin(direction), other.cx + distance * np.cos(direction)
    if not (0 <= cy < height and 0 <= cx < width):
        return None
    for n in nuclei:  # do not bury a third nucleus
        if n is not other and np.hypot(n.cy - cy, n.cx - cx) < 0.9 * (radius + n.radius):
            return None
    return cy, cx


def _free_centre(rng: np.random.Generator, nuclei: list[Nucleus], shape: dict[str, Any], height: int,
                 width: int) -> tuple[float, float] | None:
    """A centre at least 3 px clear of every existing nucleus, or None after 30 tries."""
    radius = 0.5 * (shape["a"] + shape["b"])
    for _ in range(30):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if all(np.hypot(n.cy - cy, n.cx - cx) > 1.15 * (radius + n.radius) + 3 for n in nuclei):
            return cy, cx
    return None


def rasterize(nuclei: list[Nucleus], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance map and noise-free signal (photons).

    Each nucleus has a normalised radial distance `score` (< 1 inside); where two overlap, the
    pixel goes to the nucleus it is deeper inside, which cuts touching nuclei along a natural line.
    """
    instances = np.zeros((height, width), np.int32)
    best = np.full((height, width), np.inf)
    signal = np.zeros((height, width))
    for number, n in enumerate(nuclei, start=1):
        reach = max(n.a, n.b) * 1.25 + 2
        y0, y1 = max(0, int(n.cy - reach)), min(height, int(n.cy + reach) + 1)
        x0, x1 = max(0, int(n.cx - reach)), min(width, int(n.cx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        score = _score(n, yy - n.cy, xx - n.cx)
        win = (score < 1.0) & (score < best[y0:y1, x0:x1])
        best[y0:y1, x0:x1][win] = score[win]
        instances[y0:y1, x0:x1][win] = number
        signal[y0:y1, x0:x1][win] = n.brightness * (1.0 - 0.3 * score[win] ** 2)
    return instances, signal


def _score(n: Nucleus, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(n.angle), np.sin(n.angle)
    u, v = (dx * cos + dy * sin) / n.a, (-dx * sin + dy * cos) / n.b
    phi = np.arctan2(v, u)
    wobble = 1.0 + sum(amp * np.cos(order * phi + phase) for order, amp, phase in n.harmonics)
    return np.hypot(u, v) / wobble


def instances_to_labels(instances: np.ndarray, boundary: bool) -> np.ndarray:
    """Class mask (uint8) from an instance map: 0/1, or 0/1 boundary/2 interior."""
    if not boundary:
        return (instances > 0).astype(np.uint8)
    padded = np.pad(instances, 1, mode="edge")
    height, width = instances.shape
    edge = np.zeros(instances.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            edge |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] != instances
    labels = np.where(edge, 1, 2).astype(np.uint8)
    labels[instances == 0] = 0
    return labels


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect borders (numpy only, so no scipy dependency)."""
    radius = max(1, int(3 * sigma + 0.5))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = np.asarray(image, np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        length = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))
    return out


def smooth_field(rng: np.random.Generator, height: int, width: int, grid: int = 4) -> np.ndarray:
    """A slowly varying field in [0, 1]: bilinear upsampling of a coarse random grid."""
    coarse = rng.random((grid, grid))
    ys = np.linspace(0, grid - 1, height)
    xs = np.linspace(0, grid - 1, width)
    y0 = np.minimum(ys.astype(int), grid - 2)
    x0 = np.minimum(xs.astype(int), grid - 2)
    ty, tx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - tx) + coarse[y0][:, x0 + 1] * tx
    bottom = coarse[y0 + 1][:, x0] * (1 - tx) + coarse[y0 + 1][:, x0 + 1] * tx
    return top * (1 - ty) + bottom * ty


def _standardize(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-12)
