"""A faithful minimal reproduction of milesial/Pytorch-UNet's training, to measure ours against.

Why this module exists: "how much faster than the reference" needs the reference running on the
same machine, tiles and model size, in the same process, timed alternately with ours. Upstream
is a script, not a library, so the parts that cost time are reproduced here, as upstream has them:

* the model: the seed's ``DoubleConv``/``Down``/``Up``/``OutConv``/``UNet`` (milesial layout),
  without its ``use_checkpointing()``, which cannot work (it calls the ``torch.utils.checkpoint``
  module). The seed hard-codes 64 channels at full resolution; ``base_width`` scales them
  (64 = the seed exactly) so that CPU-sized benchmarks can use a narrow model. Its parameters
  and forward equal ``unetdist.model.UNet``'s with ``depth=4`` (tested);
* the data: ``BasicDataset`` of ``utils/data_loading.py``: a map-style Dataset that, per item,
  globs the image and mask files by id, opens them with PIL, resizes by ``scale`` (1.0 here), maps
  mask values to class indices and divides the image by 255 when any value exceeds 1; a
  ``DataLoader(shuffle=True, num_workers=..., pin_memory=True)``;
* the step of ``train.py``: model and inputs in channels_last, ``torch.autocast(enabled=amp)``
  (upstream's ``--amp`` defaults to off; on CUDA it means fp16 with a ``GradScaler``),
  ``CrossEntropyLoss`` + ``dice_loss(softmax, one_hot, multiclass=True)``, ``zero_grad(set_to_none)``,
  scaled backward, unscale, ``clip_grad_norm_(1.0)``, scaler step/update,
  ``RMSprop(lr=1e-5, weight_decay=1e-8, momentum=0.999, foreach=True)``, and ``loss.item()`` every
  step. Left out (not part of a training step's cost): wandb logging, the evaluation rounds and
  ``ReduceLROnPlateau``, checkpoint files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

# ---------------------------------------------------------------- the seed's model


class DoubleConv(nn.Module):
    """(convolution => [BN] => ReLU) * 2"""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Downscaling with maxpool then double conv"""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upscaling then double conv"""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True) -> None:
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = self.up(x1)
        diff_y = x2.size()[2] - x1.size()[2]
        diff_x = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UNet(nn.Module):
    """The seed's UNet; ``base_width`` replaces its hard-coded 64 (default: the seed exactly)."""

    def __init__(self, n_channels: int, n_classes: int, bilinear: bool = False, base_width: int = 64) -> None:
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        w = base_width
        self.inc = DoubleConv(n_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        factor = 2 if bilinear else 1
        self.down4 = Down(8 * w, 16 * w // factor)
        self.up1 = Up(16 * w, 8 * w // factor, bilinear)
        self.up2 = Up(8 * w, 4 * w // factor, bilinear)
        self.up3 = Up(4 * w, 2 * w // factor, bilinear)
        self.up4 = Up(2 * w, w, bilinear)
        self.outc = OutConv(w, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


def ours_to_reference_key(key: str) -> str:
    """State-dict key of ``unetdist.model.UNet(depth=4)`` -> the reference's (``downs.0`` -> ``down1``)."""
    for prefix, name in (("downs.", "down"), ("ups.", "up")):
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            return f"{name}{int(index) + 1}.{rest}"
    return key


# ---------------------------------------------------------------- upstream's loss (utils/dice_score.py)


def dice_coeff(input: Tensor, target: Tensor, reduce_batch_first: bool = False, epsilon: float = 1e-6) -> Tensor:
    """Average of Dice coefficient for all batches, or for a single mask"""
    assert input.size() == target.size()
    assert input.dim() == 3 or not reduce_batch_first
    sum_dim = (-1, -2) if input.dim() == 2 or not reduce_batch_first else (-1, -2, -3)
    inter = 2 * (input * target).sum(dim=sum_dim)
    sets_sum = input.sum(dim=sum_dim) + target.sum(dim=sum_dim)
    sets_sum = torch.where(sets_sum == 0, inter, sets_sum)
    dice = (inter + epsilon) / (sets_sum + epsilon)
    return dice.mean()


def multiclass_dice_coeff(input: Tensor, target: Tensor, reduce_batch_first: bool = False,
                          epsilon: float = 1e-6) -> Tensor:
    """Average of Dice coefficient for all classes"""
    return dice_coeff(input.flatten(0, 1), target.flatten(0, 1), reduce_batch_first, epsilon)


def dice_loss(input: Tensor, target: Tensor, multiclass: bool = False) -> Tensor:
    """Dice loss (objective to minimize) between 0 and 1"""
    fn = multiclass_dice_coeff if multiclass else dice_coeff
    return 1 - fn(input, target, reduce_batch_first=True)


# ---------------------------------------------------------------- upstream's data (utils/data_loading.py)


def load_image(filename: Path) -> Any:
    from PIL import Image

    ext = filename.suffix
    if ext == ".npy":
        return Image.fromarray(np.load(filename))
    if ext in (".pt", ".pth"):
        return Image.fromarray(torch.load(filename, weights_only=True).numpy())
    return Image.open(filename)


class BasicDataset(Dataset):
    """One image file and one mask file per tile, found by id; decoded with PIL on every access."""

    def __init__(self, images_dir: str | Path, mask_dir: str | Path, scale: float = 1.0, mask_suffix: str = "") -> None:
        self.images_dir = Path(images_dir)
        self.mask_dir = Path(mask_dir)
        assert 0 < scale <= 1, "Scale must be between 0 and 1"
        self.scale = scale
        self.mask_suffix = mask_suffix
        self.ids = sorted(p.stem for p in self.images_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if not self.ids:
            raise RuntimeError(f"No input file found in {images_dir}, make sure you put your images there")
        # Upstream scans every mask once (in a Pool) for the set of mask values.
        unique = [np.unique(np.asarray(load_image(self._file(self.mask_dir, i + self.mask_suffix)))) for i in self.ids]
        self.mask_values = sorted(np.unique(np.concatenate(unique)).tolist())

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def _file(folder: Path, stem: str) -> Path:
        found = list(folder.glob(stem + ".*"))
        assert len(found) == 1, f"Either no file or multiple files found for the ID {stem}: {found}"
        return found[0]

    @staticmethod
    def preprocess(mask_values: list[int], pil_img: Any, scale: float, is_mask: bool) -> np.ndarray:
        from PIL import Image

        w, h = pil_img.size
        new_w, new_h = int(scale * w), int(scale * h)
        assert new_w > 0 and new_h > 0, "Scale is too small, resized images would have no pixel"
        pil_img = pil_img.resize((new_w, new_h), resample=Image.NEAREST if is_mask else Image.BICUBIC)
        img = np.asarray(pil_img)
        if is_mask:
            mask = np.zeros((new_h, new_w), dtype=np.int64)
            for i, v in enumerate(mask_values):
                mask[img == v] = i
            return mask
        img = img[np.newaxis, ...] if img.ndim == 2 else img.transpose((2, 0, 1))
        if (img > 1).any():
            img = img / 255.0
        return img

    def __getitem__(self, idx: int) -> dict[str, Tensor]:
        name = self.ids[idx]
        mask = load_image(self._file(self.mask_dir, name + self.mask_suffix))
        img = load_image(self._file(self.images_dir, name))
        assert img.size == mask.size, \
            f"Image and mask {name} should be the same size, but are {img.size} and {mask.size}"
        img = self.preprocess(self.mask_values, img, self.scale, is_mask=False)
        mask = self.preprocess(self.mask_values, mask, self.scale, is_mask=True)
        return {"image": torch.as_tensor(img.copy()).float().contiguous(),
                "mask": torch.as_tensor(mask.copy()).long().contiguous()}


def reference_loader(tiles_dir: Path, batch_size: int, workers: int, pin_memory: bool, seed: int = 0) -> DataLoader:
    """Upstream's training DataLoader over ``tiles_dir/imgs`` and ``tiles_dir/masks``."""
    dataset = BasicDataset(tiles_dir / "imgs", tiles_dir / "masks", scale=1.0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), drop_last=True)


def endless(loader: DataLoader) -> Iterator[dict[str, Tensor]]:
    """Epoch after epoch (upstream's ``for epoch ...: for batch in train_loader``)."""
    while True:
        yield from loader


# ---------------------------------------------------------------- upstream's training step (train.py)


class ReferenceTrainer:
    """Upstream's model set-up, optimizer, loss scaling and per-batch step, on one device."""

    def __init__(self, *, n_channels: int, n_classes: int, base_width: int, device: torch.device, amp: bool = False,
                 learning_rate: float = 1e-5, weight_decay: float = 1e-8, momentum: float = 0.999,
                 gradient_clipping: float = 1.0, seed: int = 0) -> None:
        torch.manual_seed(seed)
        model = UNet(n_channels=n_channels, n_classes=n_classes, bilinear=False, base_width=base_width)
        model = model.to(memory_format=torch.channels_last)
        self.model = model.to(device=device)
        self.device = device
        self.amp = amp
        self.gradient_clipping = gradient_clipping
        self.optimizer = torch.optim.RMSprop(self.model.parameters(), lr=learning_rate, weight_decay=weight_decay,
                                             momentum=momentum, foreach=True)
        # Upstream: torch.cuda.amp.GradScaler(enabled=amp), which disables itself without CUDA.
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
        self.criterion = nn.CrossEntropyLoss() if n_classes > 1 else nn.BCEWithLogitsLoss()
        self.global_step = 0
        self.epoch_loss = 0.0

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type if self.device.type != "mps" else "cpu", enabled=self.amp)

    def train_step(self, batch: dict[str, Tensor]) -> float:
        """One upstream training step on a batch ``{"image", "mask"}``; returns ``loss.item()``."""
        self.model.train()
        images = batch["image"].to(device=self.device, dtype=torch.float32, memory_format=torch.channels_last)
        true_masks = batch["mask"].to(device=self.device, dtype=torch.long)
        with self._autocast():
            masks_pred = self.model(images)
            loss = self.criterion(masks_pred, true_masks)
            loss += dice_loss(F.softmax(masks_pred, dim=1).float(),
                              F.one_hot(true_masks, self.model.n_classes).permute(0, 3, 1, 2).float(),
                              multiclass=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clipping)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.global_step += 1
        value = loss.item()
        self.epoch_loss += value
        return value
