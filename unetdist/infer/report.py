"""`unetdist evaluate`: prediction files against label files, written up as JSON, Markdown, CSV and pictures.

Why this module exists: the metrics (`evaluate.py`) are pure; this is the part that reads label
images, pairs them with predictions in sorted order (as `unetdist shard` pairs images and
labels), keeps per-image and pooled counts, and writes what a person reads: `metrics.json`,
`metrics.md`, `metrics.csv` and `overlays/<name>.png` for the images with the lowest instance F1.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.data.errors import DataError
from unetdist.data.inputs import array_header, image_axes, load_array, read_label
from unetdist.data.labels import to_classes, to_instances
from unetdist.data.readers import open_image
from unetdist.infer.evaluate import (IOU_THRESHOLD, THRESHOLDS, InstanceCounts, class_scores, confusion,
                                    match_thresholds)
from unetdist.infer.instances import label_instances
from unetdist.infer.io import frame_layout, read_frames
from unetdist.infer.overlay import save_overlay

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """How predictions are scored.

    Attributes:
        num_classes: classes of the label maps (None: largest value found + 1, at least 2).
        label_type: ``classes`` (class masks) or ``instances`` (instance ids, converted to classes
            as `unetdist shard` does; the ids are then the true objects).
        iou_threshold: minimum IoU of a matched object pair.
        interior_class: seed class for instances (None: by the number of classes).
        min_size: objects smaller than this many pixels are dropped from both sides.
        overlays: pictures to write, for the images with the lowest instance F1.
    """

    num_classes: int | None = None
    label_type: str = "classes"
    iou_threshold: float = IOU_THRESHOLD
    interior_class: int | None = None
    min_size: int = 0
    overlays: int = 4


@dataclass
class ImageResult:
    name: str
    prediction: Path
    label: Path
    conf: np.ndarray
    objects: InstanceCounts
    sample: tuple[np.ndarray, np.ndarray] | None  # true and predicted instances of frame 0, for the overlay
    by_iou: dict[float, InstanceCounts]  # the same matching at each of THRESHOLDS

    def scores(self) -> dict[str, Any]:
        return {"name": self.name, "prediction": str(self.prediction), "label": str(self.label),
                **class_scores(self.conf), "instances": self.objects.scores(), **_by_iou(self.by_iou)}


def _by_iou(counts: dict[float, InstanceCounts]) -> dict[str, Any]:
    keys = ("tp", "fp", "fn", "precision", "recall", "f1", "ap")
    return {"instances_by_iou": {f"{t:.1f}": {k: c.scores()[k] for k in keys} for t, c in counts.items()}}


def _prediction(path: Path, num_classes: int) -> np.ndarray:
    """A predicted label image (TIFF, OME-Zarr, ...) as T x H x W class indices."""
    with open_image(path) as source:
        array = np.asarray(source.array[...])
    frames = array[None] if array.ndim == 2 else array
    if frames.ndim != 3:
        raise DataError(f"{path}: predicted label image of shape {array.shape} is neither H x W nor T x H x W")
    return np.stack([to_classes(f, path, "classes", num_classes) for f in frames])


def evaluate_pair(pred_path: Path, label_path: Path, num_classes: int, opts: EvalOptions) -> ImageResult:
    """Counts for one prediction file against its label file (every frame of a stack)."""
    pred = _prediction(pred_path, num_classes)
    raw = read_label(label_path, *pred.shape, pred_path)
    conf = np.zeros((num_classes, num_classes), np.int64)
    objects = InstanceCounts()
    by_iou = {t: InstanceCounts() for t in THRESHOLDS}
    sample = None
    for t in range(pred.shape[0]):
        true = to_classes(raw[t], label_path, opts.label_type, num_classes)
        conf += confusion(pred[t], true, num_classes)
        p_inst = label_instances(pred[t], num_classes, opts.interior_class, opts.min_size)
        if opts.label_type == "instances":
            t_inst = to_instances(raw[t], true, "instances", num_classes)
        else:
            t_inst = label_instances(true, num_classes, opts.interior_class, opts.min_size)
        matches = match_thresholds(t_inst, p_inst, tuple(sorted({opts.iou_threshold, *THRESHOLDS})))
        objects += matches[opts.iou_threshold]
        for threshold in THRESHOLDS:
            by_iou[threshold] += matches[threshold]
        if sample is None:
            sample = (t_inst, p_inst)
    return ImageResult(pred_path.name, pred_path, label_path, conf, objects, sample, by_iou)


def check_shapes(images: list[Path], labels: list[Path], axes: str = "auto") -> None:
    """DataError naming both files when a label's height x width is not its image's (read from headers only)."""
    for image, label in zip(images, labels):
        shape, _, tiff_axes = array_header(image)
        sizes = dict(zip(image_axes(image, shape, tiff_axes, axes), shape))
        label_shape = array_header(label)[0]
        hw = tuple(label_shape[-2:]) if len(label_shape) < 3 or label_shape[-1] != 1 else tuple(label_shape[-3:-1])
        if hw != (sizes["Y"], sizes["X"]):
            raise DataError(f"{label} is {hw[0]} x {hw[1]} but its image {image} is {sizes['Y']} x {sizes['X']} "
                            "(H x W); images and labels are paired in sorted order: check both lists")


def infer_num_classes(paths: list[Path]) -> int:
    """Largest label value in `paths` + 1 (at least 2)."""
    return max([2] + [int(np.max(load_array(p), initial=0)) + 1 for p in paths])


def evaluate_files(preds: list[Path], labels: list[Path], out_dir: Path, opts: EvalOptions,
                   images: list[Path] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score `preds` against `labels` (matched by position) and write the reports; returns metrics.json's content.

    `images` (the raw images, matched by position too) are only needed for the overlay pictures;
    `extra` entries are added to metrics.json as they are.
    """
    if opts.label_type not in ("classes", "instances"):
        raise ValueError(f"label_type must be classes or instances, got {opts.label_type!r}")
    for what, other in (("labels", labels), ("images", images)):
        if other is not None and len(other) != len(preds):
            raise DataError(f"{len(preds)} predictions but {len(other)} {what}; they are matched in sorted order, "
                            "so the counts must be equal")
    num_classes = opts.num_classes or infer_num_classes(
        list(preds) + (list(labels) if opts.label_type == "classes" else []))
    results = [evaluate_pair(p, l, num_classes, opts) for p, l in zip(preds, labels)]
    pooled_objects = InstanceCounts()
    pooled_by_iou = {t: InstanceCounts() for t in THRESHOLDS}
    for r in results:
        pooled_objects += r.objects
        for t in THRESHOLDS:
            pooled_by_iou[t] += r.by_iou[t]
    per_image = [r.scores() for r in results]
    metrics = {
        "num_classes": num_classes, "options": asdict(opts), "images": per_image,
        "pooled": {**class_scores(sum(r.conf for r in results)), "instances": pooled_objects.scores(),
                   **_by_iou(pooled_by_iou)},
        "mean_over_images": _means(per_image), **(extra or {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tables(metrics, out_dir)
    if images and opts.overlays > 0:
        metrics["overlays"] = _overlays(results, images, out_dir / "overlays", opts.overlays)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _means(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in ("dice", "iou", "instances"):
        keys = [k for k, v in per_image[0][group].items() if isinstance(v, float)]
        out[group] = {k: float(np.mean([img[group][k] for img in per_image])) for k in keys}
    return out


def _columns(num_classes: int) -> list[tuple[str, str, str]]:
    """(header, group, key) of the table columns."""
    cols = [("Dice fg", "dice", "foreground"), ("IoU fg", "iou", "foreground")]
    if num_classes > 2:
        cols += [(f"Dice {k}", "dice", f"class_{k}") for k in range(1, num_classes)]
    return cols + [("objects", "instances", "true"), ("predicted", "instances", "predicted"),
                   ("precision", "instances", "precision"), ("recall", "instances", "recall"),
                   ("F1", "instances", "f1")]


def _write_tables(metrics: dict[str, Any], out_dir: Path) -> None:
    cols = _columns(metrics["num_classes"])
    rows = [(img["name"], img) for img in metrics["images"]] + [("pooled", metrics["pooled"])]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    threshold = metrics["options"]["iou_threshold"]
    lines = [f"Objects matched at IoU >= {threshold}; pooled = from counts summed over all images.", "",
             "| image | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows:
        cells = [fmt(m[g][k]) for _, g, k in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Pooled objects by IoU threshold (optimal matching; AP = TP / (TP + FP + FN), as StarDist's "
              "accuracy):", "", "| IoU | TP | FP | FN | precision | recall | F1 | AP |", "|---" * 8 + "|"]
    for t, m in metrics["pooled"]["instances_by_iou"].items():
        lines.append(f"| {t} | " + " | ".join(fmt(m[k]) for k in ("tp", "fp", "fn", "precision", "recall", "f1",
                                                                    "ap")) + " |")
    (out_dir / "metrics.md").write_text("\n".join(lines) + "\n")
    k = metrics["num_classes"]
    header = ["image"] + [f"{g}_class_{c}" for g in ("dice", "iou") for c in range(k)] + \
        ["dice_foreground", "iou_foreground", "objects_true", "objects_predicted", "tp", "fp", "fn",
         "precision", "recall", "f1", "mean_matched_iou"]
    with open(out_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for name, m in rows:
            inst = m["instances"]
            writer.writerow([name] + [m[g][f"class_{c}"] for g in ("dice", "iou") for c in range(k)] +
                            [m["dice"]["foreground"], m["iou"]["foreground"], inst["true"], inst["predicted"],
                             inst["tp"], inst["fp"], inst["fn"], inst["precision"], inst["recall"], inst["f1"],
                             inst["mean_matched_iou"]])


def _overlays(results: list[ImageResult], images: list[Path], folder: Path, count: int) -> list[str]:
    """Pictures of the `count` images with the lowest instance F1 (then lowest foreground Dice)."""
    order = sorted(range(len(results)), key=lambda i: (results[i].objects.scores()["f1"],
                                                       class_scores(results[i].conf)["dice"]["foreground"], i))
    written = []
    for i in order[:count]:
        result = results[i]
        assert result.sample is not None
        true_inst, pred_inst = result.sample
        frame = _image_frame(images[i], true_inst.shape)
        scores = result.objects.scores()
        title = f"{images[i].name}  F1={scores['f1']:.3f}  Dice={class_scores(result.conf)['dice']['foreground']:.3f}"
        written.append(str(save_overlay(folder / f"{images[i].stem}.png", frame, true_inst, pred_inst, title)))
    return written


def _image_frame(path: Path, hw: tuple[int, ...]) -> np.ndarray:
    """Frame 0 of an image file as C x H x W; its channel count is whichever makes the frames H x W."""
    shape, _, tiff_axes = array_header(path)
    for channels in range(1, 5):
        try:
            layout = frame_layout(path, shape, tiff_axes, channels)
        except DataError:
            continue
        if (layout.height, layout.width) == tuple(hw):
            return np.asarray(read_frames(path, layout)[0])
    raise DataError(f"{path}: image of shape {shape} does not match its label's {hw[0]}x{hw[1]}")
