"""Dihedral augmentation and the normalisation shared by training and inference."""

from __future__ import annotations

import numpy as np
import pytest

from unetdist.data.augment import augment_code, dihedral
from unetdist.data.manifest import IntensityStats, normalize


def test_eight_distinct_transforms_keep_image_and_label_aligned() -> None:
    label = np.arange(36, dtype=np.uint8).reshape(6, 6)  # no symmetry: each transform differs
    image = np.stack([label.astype(np.uint16) * 100, label.astype(np.uint16) + 7])
    results = set()
    for code in range(8):
        out_image, out_label = dihedral(image, label, code)
        assert out_image.shape == image.shape and out_image.dtype == np.uint16
        assert out_image.flags.c_contiguous and out_label.flags.c_contiguous
        np.testing.assert_array_equal(out_image[0], out_label.astype(np.uint16) * 100)
        np.testing.assert_array_equal(out_image[1], out_label.astype(np.uint16) + 7)
        results.add(out_label.tobytes())
    assert len(results) == 8
    np.testing.assert_array_equal(dihedral(image, label, 0)[1], label)
    np.testing.assert_array_equal(dihedral(image, label, 1)[1], np.rot90(label))
    np.testing.assert_array_equal(dihedral(image, label, 4)[1], label[:, ::-1])
    with pytest.raises(ValueError):
        dihedral(image, label, 8)


def test_augment_code_is_a_pure_function_of_the_position() -> None:
    codes = [augment_code(1, 0, 0, 0, p) for p in range(400)]
    assert codes == [augment_code(1, 0, 0, 0, p) for p in range(400)]
    counts = np.bincount(codes, minlength=8)
    assert counts.min() > 25  # all 8 used, roughly uniformly
    assert codes != [augment_code(1, 0, 0, 1, p) for p in range(400)]  # epoch matters
    assert codes != [augment_code(1, 1, 0, 0, p) for p in range(400)]  # rank matters
    assert codes != [augment_code(1, 0, 1, 0, p) for p in range(400)]  # lane matters


STATS = IntensityStats(low=(100.0, 0.0), high=(1100.0, 10.0), clipped_mean=(600.0, 5.0), clipped_std=(250.0, 2.0))


def test_normalize_clips_then_standardises_per_channel() -> None:
    image = np.array([[[0, 100, 600, 1100, 60000]], [[0, 5, 7, 10, 11]]], dtype=np.uint16)  # 2 x 1 x 5
    out = normalize(image, STATS)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out[0, 0], [-2.0, -2.0, 0.0, 2.0, 2.0])
    np.testing.assert_allclose(out[1, 0], [-2.5, 0.0, 1.0, 2.5, 2.5])
    batch = normalize(np.stack([image, image]), STATS)
    np.testing.assert_array_equal(batch[1], out)
    as_dict = {"low": [100.0, 0.0], "high": [1100.0, 10.0], "clipped_mean": [600.0, 5.0], "clipped_std": [250.0, 2.0]}
    np.testing.assert_array_equal(normalize(image, as_dict), out)


def test_normalize_single_channel_2d_and_channel_mismatch() -> None:
    one = IntensityStats(low=(0.0,), high=(10.0,), clipped_mean=(5.0,), clipped_std=(5.0,))
    np.testing.assert_allclose(normalize(np.array([[0, 10]], np.uint16), one), [[-1.0, 1.0]])
    with pytest.raises(ValueError, match="channels"):
        normalize(np.zeros((3, 4, 4)), STATS)
    with pytest.raises(ValueError, match="one channel"):
        normalize(np.zeros((4, 4)), STATS)
