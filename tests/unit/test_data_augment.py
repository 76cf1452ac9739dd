"""Augmentation (geometry, intensity, flips) and the normalisation shared by training and inference."""

from __future__ import annotations

import numpy as np
import pytest

from unetdist.config import AugmentConfig
from unetdist.data.augment import (as_augment_config, augment_code, dihedral, dihedral_all, elastic_field, intensity,
                                   spatial)
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


# --- the full augmentation: geometry moves image, label and weights together; intensity changes only the image


def _ramps(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image channels that hold their own y and x coordinate, random labels, weights = y + x."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    label = np.random.default_rng(0).integers(0, 3, (size, size)).astype(np.uint8)
    return np.stack([yy, xx]), label, yy + xx


@pytest.mark.parametrize("seed", range(6))
def test_geometry_moves_image_label_and_weights_together(seed: int) -> None:
    cfg = AugmentConfig(crop=40, rotate_p=1.0, scale_p=1.0, elastic_p=1.0, rotate_deg=30.0, elastic_sigma=4.0)
    image, label, weight = _ramps(64)
    rng = np.random.default_rng(seed)
    out_image, out_label, out_weight = spatial(rng, cfg, seed % 8, image, label, weight)
    assert out_image.shape == (2, 40, 40) and out_label.shape == (40, 40) and out_weight.shape == (40, 40)
    assert out_label.dtype == np.uint8 and set(np.unique(out_label)) <= {0, 1, 2}  # still valid class ids
    src_y, src_x = out_image  # where each output pixel was sampled (mirrored into the tile)
    np.testing.assert_allclose(out_weight, src_y + src_x, atol=1e-3)  # weights: linear, same place
    inside = (np.abs(src_y % 1 - 0.5) > 0.02) & (np.abs(src_x % 1 - 0.5) > 0.02)  # nearest is unambiguous
    nearest = label[np.rint(src_y).astype(int), np.rint(src_x).astype(int)]
    assert inside.mean() > 0.8
    np.testing.assert_array_equal(out_label[inside], nearest[inside])
    assert not np.allclose(src_y, np.mgrid[0:40, 0:40][0] + src_y.min())  # really deformed, not a plain crop


def test_plain_crops_are_exact_and_foreground_oversampling_finds_the_foreground() -> None:
    image, label, weight = _ramps(64)
    cfg = AugmentConfig(crop=16, flip=False)
    out_image, out_label, out_weight = spatial(np.random.default_rng(1), cfg, 0, image, label, weight)
    y, x = int(out_image[0, 0, 0]), int(out_image[1, 0, 0])
    np.testing.assert_array_equal(out_image, image[:, y:y + 16, x:x + 16])
    np.testing.assert_array_equal(out_label, label[y:y + 16, x:x + 16])
    np.testing.assert_array_equal(out_weight, weight[y:y + 16, x:x + 16])
    sparse = np.zeros((64, 64), np.uint8)
    sparse[50, 7] = 2  # one foreground pixel
    always = AugmentConfig(crop=16, flip=False, foreground_oversample=1.0)
    never = AugmentConfig(crop=16, flip=False, foreground_oversample=0.0)
    hits = [spatial(np.random.default_rng(s), c, 0, image, sparse, None)[1].max() for c in (always, never)
            for s in range(40)]
    assert all(h == 2 for h in hits[:40])  # every oversampled crop contains it
    assert sum(h == 2 for h in hits[40:]) < 20  # uniform crops mostly miss it


def test_flips_without_interpolation_match_dihedral() -> None:
    image, label, weight = _ramps(12)
    out = spatial(np.random.default_rng(0), AugmentConfig(), 5, image, label, weight)
    expected = dihedral_all([image, label, weight], 5)
    for a, b in zip(out, expected):
        np.testing.assert_array_equal(a, b)


def test_intensity_changes_only_within_configured_bounds() -> None:
    image = np.random.default_rng(0).standard_normal((2, 32, 32)).astype(np.float32)
    off = AugmentConfig()
    np.testing.assert_array_equal(intensity(np.random.default_rng(0), off, image.copy()), image)
    shift = AugmentConfig(intensity_p=1.0, brightness=0.5, contrast=0.0, gamma=0.0)
    out = intensity(np.random.default_rng(0), shift, image.copy())
    delta = out - image
    assert out.dtype == np.float32 and np.allclose(delta, delta.flat[0], atol=1e-5) and 0 < abs(delta.flat[0]) <= 0.5
    full = AugmentConfig(intensity_p=1.0, noise_p=1.0, blur_p=1.0, blur_sigma=1.5)
    outs = [intensity(np.random.default_rng(s), full, image.copy()) for s in (3, 3, 4)]
    np.testing.assert_array_equal(outs[0], outs[1])  # a pure function of the generator
    assert not np.array_equal(outs[0], outs[2]) and np.isfinite(outs[0]).all()
    assert outs[0].std() < image.std()  # blur smooths the white-noise test image


def test_elastic_field_is_the_bicubic_zoom_of_a_gaussian_lattice() -> None:
    from scipy import ndimage

    field = elastic_field(np.random.default_rng(7), 3, 10.0, 50)
    lattice = np.random.default_rng(7).normal(0.0, 10.0, (2, 3, 3))
    for c in range(2):
        zoomed = ndimage.zoom(lattice[c], 50 / 3, order=3, mode="nearest", grid_mode=False)
        np.testing.assert_allclose(field[c], zoomed, atol=1e-3)
    np.testing.assert_allclose(field[:, ::49, ::49], lattice[:, ::2, ::2], atol=1e-3)  # corners are lattice points


def test_augment_section_accepts_the_old_boolean() -> None:
    from unetdist.config import load_config

    assert load_config(None, ["data.augment=false"]).data.augment == AugmentConfig(enabled=False)
    cfg = load_config(None, ["data.augment=true", "data.augment.crop=64", "data.augment.elastic_p=0.5"])
    assert cfg.data.augment == AugmentConfig(crop=64, elastic_p=0.5)
    assert as_augment_config(False) == AugmentConfig(enabled=False)
