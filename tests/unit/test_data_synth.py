"""The synthetic nuclei generator: deterministic, 16-bit, valid labels, realistic variety."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from unetdist.config import SynthConfig
from unetdist.data.synth import generate_dataset, instances_to_labels, synth_image


def _touching_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different nuclei that share an edge or a corner."""
    pairs: set[tuple[int, int]] = set()
    h, w = instances.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = instances[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        b = instances[max(0, dy) :, max(0, dx) : w + min(0, dx)][: a.shape[0], : a.shape[1]]
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= {(int(min(x, y)), int(max(x, y))) for x, y in zip(a[touch], b[touch])}
    return pairs


def test_same_seed_same_arrays_and_different_seed_differs() -> None:
    image, instances = synth_image(7, 0, 64, 96)
    again, again_instances = synth_image(7, 0, 64, 96)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(instances, again_instances)
    assert not np.array_equal(image, synth_image(8, 0, 64, 96)[0])
    assert not np.array_equal(image, synth_image(7, 1, 64, 96)[0])


def test_generate_dataset_writes_uint16_images_and_valid_labels(tmp_path: Path) -> None:
    synth = SynthConfig(images=3, height=64, width=80, seed=5, boundary=False)
    pairs = generate_dataset(tmp_path / "a", synth)
    assert [(p.name, q.name) for p, q in pairs] == [(f"img_{i:04d}.tif", f"lbl_{i:04d}.tif") for i in range(3)]
    again = generate_dataset(tmp_path / "b", synth)
    for (image_path, label_path), (image_path_b, label_path_b) in zip(pairs, again):
        image, label = tifffile.imread(image_path), tifffile.imread(label_path)
        assert image.dtype == np.uint16 and image.shape == (64, 80)
        assert label.dtype == np.uint8 and label.shape == (64, 80)
        assert set(np.unique(label)) <= {0, 1}
        assert image.max() > 255  # really uses the 16-bit range
        np.testing.assert_array_equal(image, tifffile.imread(image_path_b))
        np.testing.assert_array_equal(label, tifffile.imread(label_path_b))


def test_image_index_does_not_depend_on_image_count(tmp_path: Path) -> None:
    few = generate_dataset(tmp_path / "few", SynthConfig(images=1, height=32, width=32, seed=2))
    many = generate_dataset(tmp_path / "many", SynthConfig(images=2, height=32, width=32, seed=2))
    np.testing.assert_array_equal(tifffile.imread(few[0][0]), tifffile.imread(many[0][0]))


def test_touching_and_separate_nuclei_and_boundary_separates_them() -> None:
    image, instances = synth_image(0, 0, 256, 256)
    ids = set(np.unique(instances)) - {0}
    touching = _touching_pairs(instances)
    assert len(ids) >= 15
    assert touching, "no touching nuclei"
    assert ids - {i for pair in touching for i in pair}, "no separate nuclei"
    labels = instances_to_labels(instances, boundary=True)
    assert set(np.unique(labels)) == {0, 1, 2}
    # wherever two different nuclei meet, neither pixel is interior: the boundary class separates them
    interior = np.where(labels == 2, instances, 0)
    assert not _touching_pairs(interior)
    assert np.array_equal(labels > 0, instances > 0)


def test_variety_of_size_brightness_and_an_uneven_background() -> None:
    image, instances = synth_image(3, 0, 256, 256)
    ids = [i for i in np.unique(instances) if i]
    areas = np.array([(instances == i).sum() for i in ids])
    brightness = np.array([image[instances == i].mean() for i in ids])
    assert np.percentile(areas, 90) > 2 * np.percentile(areas, 10)
    background = image[instances == 0].astype(float)
    assert np.median(brightness) > np.percentile(background, 99)  # nuclei stand out
    assert (brightness.max() - background.mean()) > 2.5 * (brightness.min() - background.mean())
    quadrants = [image[:128, :128], image[:128, 128:], image[128:, :128], image[128:, 128:]]
    masks = [instances[:128, :128], instances[:128, 128:], instances[128:, :128], instances[128:, 128:]]
    levels = [np.median(q[m == 0]) for q, m in zip(quadrants, masks)]
    assert max(levels) - min(levels) > 20  # uneven illumination, well above the noise of a median
    assert background.std() > 5  # noisy, not flat
