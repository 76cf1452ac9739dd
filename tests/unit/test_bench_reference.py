"""The reference trainer is the seed's model and upstream's loss, data and step, and matches ours where it must."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unetdist.bench import reference as ref
from unetdist.model import UNet


def _pair(width: int) -> tuple[ref.UNet, UNet]:
    torch.manual_seed(0)
    ours = UNet(in_channels=1, num_classes=2, base_width=width, depth=4)
    theirs = ref.UNet(n_channels=1, n_classes=2, bilinear=False, base_width=width)
    theirs.load_state_dict({ref.ours_to_reference_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    return theirs, ours


def test_default_reference_is_the_seed_size() -> None:
    with torch.device("meta"):
        theirs = ref.UNet(n_channels=1, n_classes=2)
        ours = UNet()
    assert sum(p.numel() for p in theirs.parameters()) == 31_036_546
    assert sum(p.numel() for p in ours.parameters()) == 31_036_546
    assert not hasattr(theirs, "use_checkpointing")


@pytest.mark.parametrize("width", [4, 64])
def test_parameters_map_one_to_one(width: int) -> None:
    with torch.device("meta"):
        theirs = ref.UNet(n_channels=1, n_classes=2, base_width=width).state_dict()
        ours = UNet(base_width=width).state_dict()
    mapped = {ref.ours_to_reference_key(k): tuple(v.shape) for k, v in ours.items()}
    assert mapped == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("train", [True, False])
def test_forward_identical_to_ours(train: bool) -> None:
    """Same weights, same input: the same logits bit for bit (same ops in the same order)."""
    theirs, ours = _pair(width=4)
    theirs.train(train)
    ours.train(train)
    x = torch.randn(2, 1, 37, 50)  # odd sizes: the padding path too
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)


def test_upstream_dice_loss() -> None:
    target = F.one_hot(torch.tensor([[[0, 1], [1, 1]]]), 2).permute(0, 3, 1, 2).float()
    assert float(ref.dice_loss(target, target, multiclass=True)) == pytest.approx(0.0, abs=1e-6)
    # upstream pools every class and sample into one Dice: 2 * 0 / (4 + 4) for the complement
    assert float(ref.dice_loss(1 - target, target, multiclass=True)) == pytest.approx(1.0, abs=1e-6)


def _write_tiles(folder: Path, count: int = 3, size: int = 16) -> None:
    (folder / "imgs").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(300, 4000, (size, size)).astype(np.uint16)).save(folder / "imgs" / f"t{i}.png")
        Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255).save(folder / "masks" / f"t{i}.png")


def test_dataset_reads_one_png_pair_per_tile(tmp_path: Path) -> None:
    _write_tiles(tmp_path)
    dataset = ref.BasicDataset(tmp_path / "imgs", tmp_path / "masks")
    assert len(dataset) == 3 and dataset.mask_values == [0, 255]
    item = dataset[1]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    raw = np.asarray(Image.open(tmp_path / "imgs" / "t1.png"))
    assert raw.dtype == np.uint16  # 16-bit read as 16-bit, then upstream's /255
    np.testing.assert_allclose(item["image"][0].numpy(), raw / 255.0, rtol=1e-6)
    assert set(item["mask"].unique().tolist()) <= {0, 1} and item["mask"].dtype == torch.int64


def test_reference_step_is_upstreams(tmp_path: Path) -> None:
    _write_tiles(tmp_path)
    trainer = ref.ReferenceTrainer(n_channels=1, n_classes=2, base_width=4, device=torch.device("cpu"))
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.RMSprop)
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (1e-5, 1e-8, 0.999)
    assert trainer.model.inc.double_conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not trainer.grad_scaler.is_enabled()  # upstream's --amp is off by default
    batch = next(iter(ref.reference_loader(tmp_path, batch_size=2, workers=0, pin_memory=False)))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.train_step(batch)
    assert np.isfinite(loss) and trainer.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
