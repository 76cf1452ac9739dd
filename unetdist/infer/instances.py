"""Object (nucleus) instances from a class-label map: the unit microscopists count and report.

Why this module exists: a semantic U-Net output says which pixels are nucleus, not which
nucleus. Predictions and ground truth go through the same rule as training labels
(`unetdist.data.labels.classes_to_instances`), so instance metrics compare like with like:

- 2 classes (background, nucleus): connected components of class 1 (4-connected). Touching
  nuclei with no background between them merge into one instance.
- 3 classes (background, boundary, interior; `unetdist synth --boundary`): connected components
  of the interior are the seeds, and a watershed inside the foreground gives each boundary pixel
  to a seed, so touching nuclei stay apart. Foreground pieces no seed reaches are their own.
"""

from __future__ import annotations

import numpy as np

from unetdist.data.labels import classes_to_instances, default_interior

__all__ = ["default_interior", "label_instances"]


def label_instances(labels: np.ndarray, num_classes: int, interior_class: int | None = None,
                    min_size: int = 0, interior_prob: np.ndarray | None = None) -> np.ndarray:
    """int32 instance ids (0 background, 1..N) of an H x W class-label map.

    Args:
        labels: H x W class indices.
        num_classes: the model's classes; picks the default interior class.
        interior_class: the seed class (default: see `default_interior`); every other non-zero
            class is treated as boundary and joins the nearest seed.
        min_size: instances of fewer pixels are dropped (ids are then renumbered 1..N).
        interior_prob: H x W probability of the interior class; the watershed then follows it.
    """
    if labels.ndim != 2:
        raise ValueError(f"label_instances expects an H x W map, got shape {labels.shape}")
    instances = classes_to_instances(labels, num_classes, interior_class, interior_prob)
    if min_size > 0 and instances.max(initial=0):
        instances = _drop_small(instances, min_size)
    return instances.astype(np.int32, copy=False)


def _drop_small(instances: np.ndarray, min_size: int) -> np.ndarray:
    sizes = np.bincount(instances.ravel())
    keep = sizes >= min_size
    keep[0] = False
    new_ids = np.zeros(sizes.shape[0], np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[instances]
