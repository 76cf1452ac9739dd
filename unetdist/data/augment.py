"""Training augmentation, per sample, in the loader workers.

Geometry (image, label and weight map move together): a random crop from the stored tile,
optionally centred on a foreground pixel (nnU-Net's foreground oversampling), small rotations,
scaling and the U-Net paper's elastic deformation (random displacements on a coarse grid,
bicubically interpolated to every pixel), all folded into one resampling of the tile (linear for
the image and the weights, nearest for labels, so labels stay valid class ids; mirrored at the
tile border), then one of the 8 flips/90-degree rotations (exact). Samples that draw none of the
interpolating transforms are only sliced and flipped, which is exact and cheap.
Intensity (after normalisation, image only): brightness, contrast, gamma, Gaussian noise, blur.

Every random choice of a sample comes from a generator seeded by its position in the stream
(seed, rank, lane, epoch, position), not from a running RNG, so a resumed stream can skip samples
without decoding them and still give every later sample the same transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from unetdist.config import AugmentConfig

NUM_TRANSFORMS = 8


def augment_code(seed: int, rank: int, lane: int, epoch: int, position: int) -> int:
    """Which of the 8 flips/rotations sample `position` of a stream gets, in [0, 8)."""
    sequence = np.random.SeedSequence([seed % 2**63, rank, lane, epoch, position, 0xA06])
    return int(sequence.generate_state(1)[0] % NUM_TRANSFORMS)


def sample_rng(seed: int, rank: int, lane: int, epoch: int, position: int) -> np.random.Generator:
    """The generator for every other random choice of sample `position`."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, rank, lane, epoch, position, 0xA07]))


def dihedral(image: np.ndarray, label: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply transform `code`: rotate by 90 x (code % 4) degrees, then mirror left-right if code >= 4.

    `image` is C x H x W and `label` H x W; both get the same transform. Code 0 is the identity.
    """
    out = dihedral_all([image, label], code)
    return out[0], out[1]


def dihedral_all(arrays: list[np.ndarray | None], code: int, copy: bool = True) -> list[np.ndarray | None]:
    """The same flip/rotation `code` on every array (last two axes); None stays None.

    With `copy=False` the results are views (the loader copies them once, into the batch).
    """
    if not 0 <= code < NUM_TRANSFORMS:
        raise ValueError(f"transform code must be in [0, {NUM_TRANSFORMS}), got {code}")
    turns, mirror = code % 4, code >= 4
    out: list[np.ndarray | None] = []
    for array in arrays:
        if array is not None:
            array = np.rot90(array, turns, axes=(-2, -1))
            array = array[..., ::-1] if mirror else array
            array = np.ascontiguousarray(array) if copy else array
        out.append(array)
    return out


def crop_start(rng: np.random.Generator, cfg: AugmentConfig, label: np.ndarray, crop: int) -> tuple[int, int]:
    """Top-left of the crop: uniform, or (with foreground_oversample) around a random foreground pixel."""
    height, width = label.shape
    if rng.random() < cfg.foreground_oversample:
        foreground = np.flatnonzero(label)
        if foreground.size:
            y, x = divmod(int(foreground[rng.integers(foreground.size)]), width)
            return min(max(y - crop // 2, 0), height - crop), min(max(x - crop // 2, 0), width - crop)
    return int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))


def cubic_matrix(grid: int, size: int) -> np.ndarray:
    """size x grid matrix of cubic-spline interpolation from `grid` lattice points to `size` pixels.

    The spline is linear in the lattice values and separable, so M @ C @ M.T equals a bicubic zoom
    of the lattice C (scipy.ndimage.zoom, order 3), at a fraction of its cost.
    """
    key = (grid, size)
    if key not in _CUBIC:
        basis = np.eye(grid)
        _CUBIC[key] = np.stack([ndimage.zoom(e, size / grid, order=3, mode="nearest", grid_mode=False)
                                for e in basis], axis=1).astype(np.float32)
    return _CUBIC[key]


_CUBIC: dict[tuple[int, int], np.ndarray] = {}


def elastic_field(rng: np.random.Generator, grid: int, sigma: float, size: int) -> np.ndarray:
    """2 x size x size displacements: N(0, sigma) on a grid x grid lattice, bicubic in between."""
    return expand_lattice(rng.normal(0.0, sigma, (2, grid, grid)).astype(np.float32), size)


def expand_lattice(coarse: np.ndarray, size: int) -> np.ndarray:
    """2 x grid x grid lattice displacements -> 2 x size x size, bicubic (M @ C @ M.T per axis)."""
    matrix = cubic_matrix(coarse.shape[-1], size)
    return np.stack([matrix @ c @ matrix.T for c in coarse])


def sample_coordinates(size: int, start: tuple[int, int], angle: float, zoom: float,
                       displacement: np.ndarray | None) -> np.ndarray:
    """Source coordinates (2 x size x size, float32) of every output pixel; identity = the crop at `start`."""
    centre = (size - 1) / 2.0
    offsets = np.arange(size, dtype=np.float32) - np.float32(centre)
    cos, sin = np.float32(math.cos(angle) / zoom), np.float32(math.sin(angle) / zoom)
    ys = (cos * offsets)[:, None] - (sin * offsets)[None, :] + np.float32(start[0] + centre)
    xs = (sin * offsets)[:, None] + (cos * offsets)[None, :] + np.float32(start[1] + centre)
    coords = np.stack([ys, xs])
    return coords if displacement is None else coords + displacement


def resample(coords: np.ndarray, image: np.ndarray, label: np.ndarray,
             weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Image and weights linearly, labels by nearest neighbour, all mirrored at the tile border.

    torch's grid_sample (one thread in a loader worker) is 5x faster here than scipy's
    map_coordinates; "reflection" with align_corners=True is scipy's "mirror".
    """
    height, width = label.shape
    grid = torch.from_numpy(np.stack([coords[1] * (2.0 / max(width - 1, 1)) - 1.0,
                                      coords[0] * (2.0 / max(height - 1, 1)) - 1.0], axis=-1))[None]
    planes = [image.astype(np.float32, copy=False)]
    if weight is not None:
        planes.append(weight[None].astype(np.float32, copy=False))
    stacked = torch.from_numpy(np.ascontiguousarray(np.concatenate(planes)))[None]
    linear = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    nearest = F.grid_sample(torch.from_numpy(label.astype(np.float32))[None, None], grid, mode="nearest",
                            padding_mode="reflection", align_corners=True)[0, 0]
    out = linear.numpy()
    channels = image.shape[0]
    return out[:channels], nearest.numpy().astype(label.dtype), out[channels] if weight is not None else None


@dataclass(frozen=True)
class SpatialDraw:
    """The random geometry of one sample: crop start, rotation, zoom, elastic lattice, flip code."""

    crop: int
    start: tuple[int, int]
    angle: float  # radians
    zoom: float
    coarse: np.ndarray | None  # 2 x grid x grid lattice displacements (px), or None
    code: int  # the flip/rotation, 0 when flips are off

    @property
    def interpolates(self) -> bool:
        return self.angle != 0.0 or self.zoom != 1.0 or self.coarse is not None


def draw_spatial(rng: np.random.Generator, cfg: AugmentConfig, code: int, label: np.ndarray) -> SpatialDraw:
    """Draw a sample's geometry; the loader (`spatial`) and the device path (`augment_batch`) apply it."""
    size = label.shape[-1]
    crop = cfg.crop or size
    start = crop_start(rng, cfg, label, crop) if crop < size else (0, 0)
    angle = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)) if rng.random() < cfg.rotate_p else 0.0
    zoom = rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale) if rng.random() < cfg.scale_p else 1.0
    coarse = rng.normal(0.0, cfg.elastic_sigma, (2, cfg.elastic_grid, cfg.elastic_grid)).astype(np.float32) \
        if rng.random() < cfg.elastic_p else None
    return SpatialDraw(crop, start, angle, zoom, coarse, code if cfg.flip else 0)


def spatial(rng: np.random.Generator, cfg: AugmentConfig, code: int, image: np.ndarray, label: np.ndarray,
            weight: np.ndarray | None, copy: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Crop, rotate, scale, deform and flip a C x T x T image with its T x T label and weights.

    With `copy=False` the results may be views of the inputs.
    """
    return apply_spatial(draw_spatial(rng, cfg, code, label), image, label, weight, copy)


def apply_spatial(draw: SpatialDraw, image: np.ndarray, label: np.ndarray, weight: np.ndarray | None,
                  copy: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`draw` on one sample: exact slicing when nothing interpolates, else one resampling; then the flip."""
    crop = draw.crop
    if not draw.interpolates:
        y, x = draw.start
        window = (slice(y, y + crop), slice(x, x + crop))
        image, label = image[(slice(None), *window)], label[window]
        weight = None if weight is None else weight[window]
    else:
        field = None if draw.coarse is None else expand_lattice(draw.coarse, crop)
        image, label, weight = resample(sample_coordinates(crop, draw.start, draw.angle, draw.zoom, field),
                                        image, label, weight)
    image, label, weight = dihedral_all([image, label, weight], draw.code, copy=copy)
    return image, label, weight


def intensity(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray) -> np.ndarray:
    """Brightness, contrast, gamma, noise and blur on a normalised float32 C x H x W image, in place."""
    if rng.random() < cfg.intensity_p:
        image += np.float32(rng.uniform(-cfg.brightness, cfg.brightness))
    if rng.random() < cfg.intensity_p:
        mean = image.mean(axis=(-2, -1), keepdims=True)
        image -= mean
        image *= np.float32(rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast))
        image += mean
    if rng.random() < cfg.intensity_p:
        low = image.min(axis=(-2, -1), keepdims=True)
        span = np.maximum(image.max(axis=(-2, -1), keepdims=True) - low, np.float32(1e-6))
        gamma = np.float32(math.exp(rng.uniform(-cfg.gamma, cfg.gamma)))
        image -= low
        image /= span
        np.power(image, gamma, out=image)
        image *= span
        image += low
    if rng.random() < cfg.noise_p:
        std = rng.uniform(0.0, cfg.noise_std)
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
    if rng.random() < cfg.blur_p:
        sigma = rng.uniform(0.5, cfg.blur_sigma)
        image[...] = ndimage.gaussian_filter(image, (0, sigma, sigma), mode="mirror")
    return image


def as_augment_config(value: AugmentConfig | bool) -> AugmentConfig:
    """`data.augment` as a section, accepting the older plain true/false."""
    if isinstance(value, bool):
        return AugmentConfig(enabled=value)
    return value
