"""Loss and segmentation metrics that stay exact under data parallelism.

The loss averages per-sample terms, so the mean over ranks equals the loss of the global
batch; validation metrics come from global pixel counts all-reduced across ranks (a mean of
per-rank Dice scores would weight ranks, not pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unetdist.parallel.collectives import all_reduce_sum_
from unetdist.parallel.env import DistEnv


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the foreground classes, computed per sample then averaged.

    Per-sample (not batch-pooled) so that DDP's gradient average over ranks reproduces the
    single-process gradient of the same global batch exactly.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice[:, 1:].mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy (optionally weighted per pixel, the U-Net paper's w(x)) + `dice_weight` x soft Dice.

    The weighted cross-entropy is the mean of w(x) * CE(x) over all pixels, so equal-sized per-rank
    batches average to the global-batch loss exactly as the unweighted one does.
    """
    if pixel_weight is None:
        ce = F.cross_entropy(logits.float(), target)
    else:
        ce = (F.cross_entropy(logits.float(), target, reduction="none") * pixel_weight.float()).mean()
    if dice_weight == 0:
        return ce
    return ce + dice_weight * soft_dice_loss(logits, target)


class ConfusionCounter:
    """Per-class true-positive / false-positive / false-negative pixel counts, summed over batches."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        # rows: tp, fp, fn per class; then [foreground tp, fp, fn]; float64 keeps counts exact far past 2**24.
        self.counts = torch.zeros(3, num_classes + 1, dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped = torch.zeros((), dtype=torch.float64, device=device)  # damaged samples the loader dropped

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        pred = logits.argmax(dim=1)
        k = self.num_classes
        index = (target * k + pred).flatten()
        confusion = torch.bincount(index, minlength=k * k).reshape(k, k).to(torch.float64)  # [true, pred]
        tp = confusion.diagonal()
        self.counts[0, :k] += tp
        self.counts[1, :k] += confusion.sum(0) - tp
        self.counts[2, :k] += confusion.sum(1) - tp
        fg_pred, fg_true = pred != 0, target != 0
        self.counts[0, k] += (fg_pred & fg_true).sum()
        self.counts[1, k] += (fg_pred & ~fg_true).sum()
        self.counts[2, k] += (~fg_pred & fg_true).sum()
        self.loss_sum += loss_sum.detach().to(torch.float64)
        self.samples += target.shape[0]

    def all_reduce(self, env: DistEnv) -> None:
        """Sum the counts over ranks; one collective per tensor, after the loop, so uneven ranks cannot deadlock."""
        all_reduce_sum_(env, self.counts, self.loss_sum, self.samples, self.skipped)

    def summary(self) -> dict[str, float]:
        tp, fp, fn = self.counts
        dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).tolist()
        iou = (tp / (tp + fp + fn).clamp_min(1)).tolist()
        out: dict[str, float] = {}
        for c in range(self.num_classes):
            out[f"dice/class_{c}"] = dice[c]
            out[f"iou/class_{c}"] = iou[c]
        out["dice/foreground"] = dice[self.num_classes]
        out["iou/foreground"] = iou[self.num_classes]
        out["dice/mean_fg_classes"] = sum(dice[1 : self.num_classes]) / (self.num_classes - 1)
        out["loss"] = float(self.loss_sum / self.samples.clamp_min(1))
        out["samples"] = float(self.samples)
        out["data_skipped"] = float(self.skipped)
        return out
