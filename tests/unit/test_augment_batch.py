"""The device-side spatial augmentation equals the loader's for the same drawn geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetdist.config import AugmentConfig
from unetdist.data.augment import apply_spatial, augment_code, draw_spatial, sample_rng
from unetdist.data.augment_batch import pack_draw, spatial_batch


@pytest.mark.parametrize("crop", [0, 40])
def test_batch_on_tensors_equals_the_loader_path_for_the_same_draws(crop: int) -> None:
    cfg = AugmentConfig(crop=crop, foreground_oversample=0.5, rotate_p=0.35, rotate_deg=30.0, scale_p=0.35,
                        elastic_p=0.35, elastic_grid=3, elastic_sigma=4.0)
    rng = np.random.default_rng(7)
    n, tile = 24, 56
    # smooth images (bilinear interpolation error stays small), blob labels, and a weight map
    yy, xx = np.mgrid[:tile, :tile].astype(np.float32)
    images = np.stack([np.stack([1000 + 800 * np.sin(xx / (5 + i % 4)) * np.cos(yy / 7 + c) for c in range(2)])
                       for i in range(n)]).astype(np.float32)
    labels = (rng.random((n, tile, tile)) < 0.02).astype(np.int64)
    labels = np.maximum(labels, (images[:, 0] > 1500).astype(np.int64) * 2)
    weights = (1.0 + labels * 3.0 + rng.random((n, tile, tile))).astype(np.float32)

    draws = [draw_spatial(sample_rng(0, 0, 0, 0, i), cfg, augment_code(0, 0, 0, 0, i), labels[i]) for i in range(n)]
    assert {d.interpolates for d in draws} == {True, False} and len({d.code for d in draws}) > 4
    expected = [apply_spatial(d, images[i], labels[i], weights[i]) for i, d in enumerate(draws)]

    params = torch.from_numpy(np.stack([pack_draw(d, cfg.elastic_grid) for d in draws]))
    size = crop or tile
    image, label, weight = spatial_batch(params, size, torch.from_numpy(images), torch.from_numpy(labels),
                                         torch.from_numpy(weights))
    assert image.shape == (n, 2, size, size) and label.shape == (n, size, size) and label.dtype == torch.int64
    for i, (e_image, e_label, e_weight) in enumerate(expected):
        torch.testing.assert_close(image[i], torch.from_numpy(e_image), rtol=1e-4, atol=0.05,
                                   msg=lambda m: f"sample {i} ({draws[i]}): {m}")
        torch.testing.assert_close(weight[i], torch.from_numpy(e_weight), rtol=1e-4, atol=1e-3)
        wrong = (label[i] != torch.from_numpy(e_label)).float().mean().item()
        assert wrong <= 2e-3, f"sample {i}: {wrong:.2%} of labels differ ({draws[i]})"
        if not draws[i].interpolates:  # plain crop + flip: exact in both paths
            assert torch.equal(label[i], torch.from_numpy(e_label))


def test_device_path_through_loader_and_trainer_matches_the_loader_path(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Real shards: the loader ships the draws (`data.augment.device=cuda`), the trainer resamples on its
    device, and the batch equals the loader-side augmentation's up to interpolation and clipping."""
    from tests.conftest import tiny_overrides
    from unetdist.config import load_config
    from unetdist.data.stream import open_manifest, train_loader
    from unetdist.parallel.env import DistEnv
    from unetdist.train.trainer import build_trainer

    batches = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(None, [*tiny_overrides(tmp_path, tiny_data), "data.workers=0", "data.augment.crop=24",
                                 "data.augment.rotate_p=0.7", "data.augment.scale_p=0.5", "data.augment.elastic_p=0.5",
                                 f"data.augment.device={device}"])
        batch = next(iter(train_loader(cfg.data, open_manifest(tiny_data, cfg.data), rank=0, world_size=1, seed=3,
                                       epoch=0)))
        assert ("spatial" in batch) == (device == "cuda")
        trainer = build_trainer(cfg, DistEnv(0, 1, 0, 1, torch.device("cpu")))
        batches[device] = trainer._to_device(batch)[:2]
    (image, label), (dev_image, dev_label) = batches["cpu"], batches["cuda"]
    assert dev_image.shape == image.shape == (4, 1, 24, 24) and dev_label.shape == label.shape
    close = torch.isclose(dev_image, image, rtol=1e-3, atol=1e-2).float().mean().item()
    assert close > 0.98, f"only {close:.1%} of pixels agree"  # the rest: clipping before vs after interpolation
    assert (dev_label == label).float().mean().item() > 0.995
