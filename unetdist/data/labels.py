"""Labels: class masks and instance ids, and the U-Net paper's per-pixel weight map.

Users bring either class masks (0 background, 1..K-1) or instance ids (0 background, one id per
cell). Training needs class masks; the weight map needs instances, to know which cell a pixel is
near. So each is derived from the other: instances become 2 classes (background / cell) or 3
(background / boundary / interior, the boundary being every cell pixel that touches another cell
or the background); 3-class masks give back instances as the connected components of the
interior, with each boundary pixel joined to the nearest one; other class masks give the
connected components of the foreground (touching cells then count as one).

Weight map (Ronneberger et al. 2015, eq. 2):

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))    on background pixels
    w(x) = w_c(x)                                                 on cell pixels

d1 and d2 are the distances to the nearest and second-nearest cell (0 inside that cell), w_c is
the class-balancing weight 1 / (K x frequency of the class of x) with frequencies over the
training split (so that the mean of w_c over the training pixels is 1), or 1 without balancing.
Distances are computed per cell in a window reaching `margin(sigma)` pixels around it, so terms
below 1e-4 x w0 are dropped; with fewer than two cells there is no border term.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetdist.data.errors import DataError
from unetdist.data.synth import instances_to_labels

BORDER_CUTOFF = 1e-4  # border terms below this fraction of w0 are dropped


def to_classes(raw: np.ndarray, path: Path, label_type: str, num_classes: int) -> np.ndarray:
    """H x W uint8 class mask from a label frame that holds classes or instance ids."""
    low, high = (raw.min(), raw.max()) if raw.size else (0, 0)
    if label_type == "classes":
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            hint = " (instance ids? then set labels=instances)" if high >= max(num_classes, 8) else ""
            raise DataError(f"{path}: label value {bad:g} is outside [0, num_classes={num_classes}); "
                            f"check num_classes or the label files{hint}")
        return raw.astype(np.uint8)
    if low < 0:
        raise DataError(f"{path}: instance id {low:g} is negative; instance labels must be 0 (background) or ids > 0")
    if num_classes not in (2, 3):
        raise DataError(f"{path}: instance labels convert to 2 classes (background, cell) or 3 (background, "
                        f"boundary, interior), not num_classes={num_classes}")
    return instances_to_labels(np.asarray(raw), boundary=num_classes == 3)


def to_instances(raw: np.ndarray, classes: np.ndarray, label_type: str, num_classes: int) -> np.ndarray:
    """H x W int32 instance ids (0 background) for the weight map: the ids given, or `classes_to_instances`."""
    if label_type == "instances":
        return _compact(np.asarray(raw))
    return classes_to_instances(classes, num_classes)


def default_interior(num_classes: int) -> int | None:
    """The interior (seed) class for `num_classes`: 2 of 3 classes, 1 of 2; None means every non-zero class."""
    return {2: 1, 3: 2}.get(num_classes)


def classes_to_instances(classes: np.ndarray, num_classes: int, interior_class: int | None = None,
                         interior_prob: np.ndarray | None = None) -> np.ndarray:
    """H x W int32 instance ids from a class map: the one rule for training labels and predictions.

    Seeds are the 4-connected components of the interior class (default: `default_interior`).
    Every other foreground pixel joins the nearest seed of its own foreground piece (scikit-image's
    `expand_labels`, Euclidean), or, given the interior probability of a prediction, the seed whose
    watershed basin of 1 - probability it lies in (restricted to the foreground). Foreground
    pieces no seed reaches become instances of their own. (On synthetic touching cells, nearest-seed
    expansion split 1 of ~200 cells, a watershed on the distance to the seeds 5 to 22.)
    """
    from skimage.measure import label
    from skimage.segmentation import expand_labels, watershed

    interior = default_interior(num_classes) if interior_class is None else interior_class
    foreground = classes != 0
    seeds = label(foreground if interior is None else classes == interior, connectivity=1)
    count = int(seeds.max())
    if count and interior_prob is not None:
        seeds = watershed(1.0 - np.asarray(interior_prob, np.float32), seeds, mask=foreground)
    elif count:
        pieces = label(foreground, connectivity=1)
        piece_of_seed = np.zeros(count + 1, pieces.dtype)
        piece_of_seed[seeds[seeds > 0]] = pieces[seeds > 0]
        grown = expand_labels(seeds, distance=max(classes.shape))
        seeds = np.where(foreground & (piece_of_seed[grown] == pieces), grown, 0)
    rest = label(foreground & (seeds == 0), connectivity=1)
    seeds[rest > 0] = rest[rest > 0] + count
    return seeds.astype(np.int32, copy=False)


def _compact(raw: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..n in order, background 0 kept (for label images without any background)."""
    ids, inverse = np.unique(raw, return_inverse=True)
    out = inverse.reshape(raw.shape).astype(np.int32)
    return out if ids[0] == 0 else out + 1


def class_weights(class_pixels: list[int] | np.ndarray, balance: bool) -> np.ndarray:
    """w_c per class: 1 / (K x frequency), 1 for classes never seen; all ones without balancing."""
    pixels = np.asarray(class_pixels, np.float64)
    if not balance or pixels.sum() == 0:
        return np.ones(len(pixels), np.float64)
    freq = pixels / pixels.sum()
    return np.where(freq > 0, 1.0 / (len(pixels) * np.maximum(freq, 1e-300)), 1.0)


def margin(sigma: float) -> int:
    """Pixels beyond which the border term is below BORDER_CUTOFF x w0 for any second distance."""
    return int(math.ceil(sigma * math.sqrt(2.0 * math.log(1.0 / BORDER_CUTOFF))))


def two_nearest(instances: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest instance, inf beyond `reach` pixels of its box."""
    d1 = np.full(instances.shape, np.inf, np.float64)
    d2 = np.full(instances.shape, np.inf, np.float64)
    for number, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        window = tuple(slice(max(0, s.start - reach), min(n, s.stop + reach)) for s, n in zip(box, instances.shape))
        distance = ndimage.distance_transform_edt(instances[window] != number)
        first, second = d1[window], d2[window]
        d2[window] = np.minimum(second, np.maximum(first, distance))
        d1[window] = np.minimum(first, distance)
    return d1, d2


def weight_map(classes: np.ndarray, instances: np.ndarray, weights_per_class: np.ndarray, w0: float,
               sigma: float) -> np.ndarray:
    """The paper's w(x) as float32 H x W (see the module docstring)."""
    out = np.asarray(weights_per_class, np.float64)[classes]
    if w0 > 0 and instances.max(initial=0) >= 2:
        d1, d2 = two_nearest(instances, margin(sigma))
        with np.errstate(invalid="ignore", over="ignore"):
            border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
        border[~np.isfinite(border)] = 0.0
        out = out + np.where(instances == 0, border, 0.0)
    return out.astype(np.float32)
