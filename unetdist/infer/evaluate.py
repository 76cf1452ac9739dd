"""Segmentation metrics as microscopy papers report them: per-class Dice and IoU, instance F1 (pure numpy).

Why this module exists: a pixel score alone hides merged or split nuclei; biologists count
objects. Everything here is counts first (confusion matrices, matched objects), so per-image
scores and pooled scores (from counts summed over images, not a mean of scores) come from one place.

Conventions:
- Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), per class; "foreground" treats every
  non-zero class as one.
- Instances are matched one to one as StarDist's `matching` does: an optimal assignment
  (Hungarian, `scipy.optimize.linear_sum_assignment`) that first maximises the number of pairs
  with IoU >= the threshold, then their total IoU; at thresholds >= 0.5 a match is unique anyway,
  below it greedy matching is not exact. Precision = TP / predicted objects, recall = TP / true
  objects, F1 = 2TP / (2TP + FP + FN), AP (StarDist's "accuracy", the Data Science Bowl's
  average precision at one threshold) = TP / (TP + FP + FN). `THRESHOLDS` are the IoUs reported.
- A ratio with a zero denominator is 1 when there was nothing to find and nothing was found
  (an empty image predicted empty), and 0 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IOU_THRESHOLD = 0.5
THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with 0/0 = 1 (see the module conventions; numerator is then 0 too)."""
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def confusion(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 K x K matrix, rows = true class, columns = predicted class."""
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {true.shape}")
    index = true.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_scores(conf: np.ndarray) -> dict[str, dict[str, float]]:
    """{"dice": {"class_k": .., "foreground": ..}, "iou": {...}} from a confusion matrix."""
    tp = np.diag(conf).astype(np.float64)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    out: dict[str, dict[str, float]] = {"dice": {}, "iou": {}}
    for k in range(conf.shape[0]):
        out["dice"][f"class_{k}"] = ratio(2 * tp[k], 2 * tp[k] + fp[k] + fn[k])
        out["iou"][f"class_{k}"] = ratio(tp[k], tp[k] + fp[k] + fn[k])
    fg_tp = float(conf[1:, 1:].sum())
    fg_fp, fg_fn = float(conf[0, 1:].sum()), float(conf[1:, 0].sum())
    out["dice"]["foreground"] = ratio(2 * fg_tp, 2 * fg_tp + fg_fp + fg_fn)
    out["iou"]["foreground"] = ratio(fg_tp, fg_tp + fg_fp + fg_fn)
    return out


@dataclass
class InstanceCounts:
    """Matched (tp), unmatched predicted (fp) and unmatched true (fn) objects, and the IoUs of the matches."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    matched_iou: list[float] = field(default_factory=list)

    def __iadd__(self, other: InstanceCounts) -> InstanceCounts:
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        self.matched_iou = self.matched_iou + other.matched_iou
        return self

    def scores(self) -> dict[str, float]:
        return {
            "true": self.tp + self.fn,
            "predicted": self.tp + self.fp,
            "tp": self.tp, "fp": self.fp, "fn": self.fn,
            "precision": ratio(self.tp, self.tp + self.fp) if self.tp + self.fp else float(self.fn == 0),
            "recall": ratio(self.tp, self.tp + self.fn) if self.tp + self.fn else float(self.fp == 0),
            "f1": ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "ap": ratio(self.tp, self.tp + self.fp + self.fn),
            "mean_matched_iou": float(np.mean(self.matched_iou)) if self.matched_iou else 0.0,
        }


def iou_pairs(true_inst: np.ndarray, pred_inst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true ids, predicted ids, IoU) of every pair of overlapping objects (ids > 0)."""
    if true_inst.shape != pred_inst.shape:
        raise ValueError(f"instance maps differ in shape: {true_inst.shape} vs {pred_inst.shape}")
    t, p = true_inst.astype(np.int64).ravel(), pred_inst.astype(np.int64).ravel()
    true_area, pred_area = np.bincount(t), np.bincount(p)
    both = (t > 0) & (p > 0)
    codes, inter = np.unique(t[both] * (p.max() + 1) + p[both], return_counts=True)
    ti, pi = codes // (p.max() + 1), codes % (p.max() + 1)
    iou = inter / (true_area[ti] + pred_area[pi] - inter)
    return ti, pi, iou


def match_instances(true_inst: np.ndarray, pred_inst: np.ndarray, threshold: float = IOU_THRESHOLD) -> InstanceCounts:
    """Optimal one-to-one matching (see the module conventions) between two instance maps (0 = background)."""
    return match_thresholds(true_inst, pred_inst, (threshold,))[threshold]


def match_thresholds(true_inst: np.ndarray, pred_inst: np.ndarray,
                     thresholds: tuple[float, ...] = THRESHOLDS) -> dict[float, InstanceCounts]:
    """`match_instances` at each threshold, from one computation of the overlaps."""
    n_true = np.unique(true_inst[true_inst > 0]).size
    n_pred = np.unique(pred_inst[pred_inst > 0]).size
    ti, pi, iou = iou_pairs(true_inst, pred_inst)
    return {t: _assign(ti, pi, iou, t, n_true, n_pred) for t in thresholds}


def _assign(ti: np.ndarray, pi: np.ndarray, iou: np.ndarray, threshold: float, n_true: int,
            n_pred: int) -> InstanceCounts:
    from scipy.optimize import linear_sum_assignment

    keep = iou >= threshold
    ti, pi, iou = ti[keep], pi[keep], iou[keep]
    if iou.size == 0:
        return InstanceCounts(0, n_pred, n_true, [])
    rows, row_of = np.unique(ti, return_inverse=True)
    cols, col_of = np.unique(pi, return_inverse=True)
    overlap = np.zeros((rows.size, cols.size))
    overlap[row_of, col_of] = iou
    cost = np.where(overlap > 0, -1.0 - overlap / 2.0, 0.0)  # first the number of matches, then their IoU
    r, c = linear_sum_assignment(cost)
    matched = [float(overlap[a, b]) for a, b in zip(r, c) if overlap[a, b] > 0]
    return InstanceCounts(len(matched), n_pred - len(matched), n_true - len(matched), matched)
