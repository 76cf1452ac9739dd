"""The U-Net paper's weight map and the class/instance conversions it depends on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from unetdist.data.errors import DataError
from unetdist.data.labels import class_weights, margin, to_classes, to_instances, weight_map
from unetdist.data.synth import instances_to_labels, synth_image


def test_weight_map_matches_a_hand_computed_case() -> None:
    # 3 rows x 9 columns; cell 1 fills column 1, cell 2 fills column 6, everything else background.
    instances = np.zeros((3, 9), np.int32)
    instances[:, 1], instances[:, 6] = 1, 2
    classes = (instances > 0).astype(np.uint8)
    wc = class_weights(np.bincount(classes.ravel()), balance=True)
    # 6 of 27 pixels are cell: w_c = 1 / (2 x 21/27) = 9/14 for background, 1 / (2 x 6/27) = 9/4 for cells.
    np.testing.assert_allclose(wc, [9 / 14, 9 / 4])
    w = weight_map(classes, instances, wc, w0=10.0, sigma=2.0)
    border = lambda d1, d2: 10.0 * math.exp(-((d1 + d2) ** 2) / (2 * 2.0**2))  # noqa: E731
    expected_row = [9 / 14 + border(1, 6), 9 / 4, 9 / 14 + border(1, 4), 9 / 14 + border(2, 3),
                    9 / 14 + border(2, 3), 9 / 14 + border(1, 4), 9 / 4, 9 / 14 + border(1, 6), 9 / 14 + border(2, 7)]
    # column 4: d1 = 2 (to column 6), d2 = 3 (to column 1); column 8: d1 = 2, d2 = 7.
    for row in w:
        np.testing.assert_allclose(row, expected_row, rtol=1e-6)
    assert w.dtype == np.float32
    unbalanced = weight_map(classes, instances, class_weights([21, 6], balance=False), w0=0.0, sigma=2.0)
    np.testing.assert_array_equal(unbalanced, np.ones((3, 9), np.float32))


def test_windowed_distances_equal_brute_force_up_to_the_documented_cutoff() -> None:
    _, instances = synth_image(seed=0, index=0, height=128, width=128)
    classes = (instances > 0).astype(np.uint8)
    assert instances.max() >= 3
    wc = np.array([1.0, 1.0])
    fast = weight_map(classes, instances, wc, w0=10.0, sigma=5.0)
    distances = np.sort(np.stack([ndimage.distance_transform_edt(instances != i)
                                  for i in range(1, instances.max() + 1)]), axis=0)
    brute = 1.0 + np.where(instances == 0, 10.0 * np.exp(-((distances[0] + distances[1]) ** 2) / 50.0), 0.0)
    assert np.abs(fast - brute).max() <= 10.0 * 1e-4 + 1e-6
    assert (brute - 1.0).max() > 1.0  # the case has touching-ish cells: the border term matters
    assert margin(5.0) == 22


def test_instances_to_classes_and_back() -> None:
    _, instances = synth_image(seed=1, index=2, height=80, width=80)
    path = Path("lbl.tif")
    three = to_classes(instances, path, "instances", 3)
    np.testing.assert_array_equal(three, instances_to_labels(instances, boundary=True))
    np.testing.assert_array_equal(to_classes(instances, path, "instances", 2), (instances > 0).astype(np.uint8))
    recovered = to_instances(three, three, "classes", 3)
    # every cell with an interior comes back as one instance covering exactly its pixels
    for cell in range(1, instances.max() + 1):
        mask = instances == cell
        if np.any(three[mask] == 2):
            ids = np.unique(recovered[mask])
            assert len(ids) == 1 and ids[0] > 0
            assert np.array_equal(recovered == ids[0], mask) or (recovered == ids[0]).sum() >= 0.9 * mask.sum()
    assert np.all((recovered > 0) == (three > 0))
    compact = to_instances(np.where(instances > 0, instances + 1000, 0), None, "instances", 3)
    assert compact.max() == len(np.unique(instances)) - 1


def test_unexpected_label_values_are_named() -> None:
    path = Path("labels/a.tif")
    with pytest.raises(DataError, match=r"a\.tif: label value 37 .*num_classes=3.*labels=instances"):
        to_classes(np.array([[0, 37]]), path, "classes", 3)
    with pytest.raises(DataError, match="negative"):
        to_classes(np.array([[0, -1]]), path, "instances", 3)
    with pytest.raises(DataError, match="num_classes=4"):
        to_classes(np.array([[0, 1]]), path, "instances", 4)
