"""Instances from class maps, overlay pictures, and the evaluate reports written from real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetdist.data.synth import instances_to_labels
from unetdist.infer.instances import label_instances
from unetdist.infer.overlay import BOTH_COLOUR, PRED_COLOUR, TRUE_COLOUR, outlines, render_overlay, save_overlay
from unetdist.infer.report import EvalOptions, evaluate_files


def _two_touching() -> np.ndarray:
    ids = np.zeros((12, 20), np.int32)
    ids[2:10, 2:10] = 1
    ids[2:10, 10:18] = 2  # shares an edge with object 1
    return ids


def test_boundary_class_separates_touching_nuclei() -> None:
    ids = _two_touching()
    three = instances_to_labels(ids, boundary=True)
    inst = label_instances(three, 3)
    assert inst.max() == 2
    assert len(np.unique(inst[ids == 1])) == 1 and len(np.unique(inst[ids == 2])) == 1
    assert set(np.unique(inst[ids == 1])) != set(np.unique(inst[ids == 2]))
    assert np.array_equal(inst > 0, ids > 0), "boundary pixels join a nucleus, background stays background"


def test_two_classes_merge_touching_nuclei_and_keep_apart_ones() -> None:
    ids = _two_touching()
    ids[0, 0] = 3
    inst = label_instances((ids > 0).astype(np.uint8), 2)
    assert inst.max() == 2 and inst[0, 0] != inst[5, 5]


def test_boundary_only_piece_is_its_own_instance_and_min_size() -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[1:4, 1:4] = 2
    labels[1:4, 4] = 1  # boundary attached to the interior
    labels[8, 8] = 1  # a stray boundary pixel with no interior
    inst = label_instances(labels, 3)
    assert inst.max() == 2 and inst[2, 4] == inst[2, 2] and inst[8, 8] not in (0, inst[2, 2])
    assert label_instances(labels, 3, min_size=2).max() == 1


def test_outlines_and_overlay_colours(tmp_path: Path) -> None:
    true = np.zeros((8, 8), np.int32)
    true[2:6, 2:6] = 1
    pred = np.zeros((8, 8), np.int32)
    pred[2:6, 3:7] = 1
    edge = outlines(true)
    assert edge[2, 2] and edge[2, 3] and not edge[3, 3] and not edge[0, 0]
    image = np.arange(64, dtype=np.uint16).reshape(1, 8, 8)
    rgb = render_overlay(image, true, pred)
    scale = rgb.shape[0] // 8
    px = lambda y, x: tuple(rgb[y * scale, x * scale])  # noqa: E731
    assert px(3, 2) == TRUE_COLOUR and px(3, 6) == PRED_COLOUR and px(2, 3) == BOTH_COLOUR
    assert px(0, 0) == (0, 0, 0) and px(7, 7) == (255, 255, 255)  # contrast stretch, outside the outlines
    path = save_overlay(tmp_path / "o.png", image, true, pred, "title")
    assert Image.open(path).size == (rgb.shape[1], rgb.shape[0] + 14)


def _write(path: Path, array: np.ndarray) -> Path:
    tifffile.imwrite(path, array)
    return path


def test_evaluate_files_writes_json_markdown_csv_and_overlays(tmp_path: Path) -> None:
    ids = _two_touching()
    true = (ids > 0).astype(np.uint8)
    perfect, empty = true.copy(), np.zeros_like(true)
    preds = [_write(tmp_path / "a_labels.tif", perfect), _write(tmp_path / "b_labels.tif", empty)]
    labels = [_write(tmp_path / "a_lbl.tif", true), _write(tmp_path / "b_lbl.tif", true)]
    images = [_write(tmp_path / f"{n}.tif", (ids * 100 + 50).astype(np.uint16)) for n in "ab"]
    out = tmp_path / "eval"
    metrics = evaluate_files(preds, labels, out, EvalOptions(overlays=1), images)
    assert metrics["num_classes"] == 2
    a, b = metrics["images"]
    assert a["dice"]["foreground"] == 1.0 and a["instances"]["f1"] == 1.0
    assert b["dice"]["foreground"] == 0.0 and b["instances"]["recall"] == 0.0
    assert metrics["pooled"]["dice"]["foreground"] == pytest.approx(2 * 128 / (2 * 128 + 128))
    assert metrics["pooled"]["instances"]["tp"] == 1 and metrics["pooled"]["instances"]["fn"] == 1
    assert metrics["mean_over_images"]["dice"]["foreground"] == pytest.approx(0.5)
    assert json.loads((out / "metrics.json").read_text())["pooled"] == metrics["pooled"]
    table = (out / "metrics.md").read_text()
    assert "| a_labels.tif | 1.0000 |" in table and "| pooled |" in table
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["image"] for r in rows] == ["a_labels.tif", "b_labels.tif", "pooled"]
    assert float(rows[1]["f1"]) == 0.0
    assert metrics["overlays"] == [str(out / "overlays" / "b.png")], "the worst image is drawn"


def test_evaluate_with_instance_labels_keeps_touching_objects_apart(tmp_path: Path) -> None:
    ids = _two_touching()
    pred = _write(tmp_path / "p.tif", (ids > 0).astype(np.uint8))  # 2 classes: touching nuclei merge
    label = _write(tmp_path / "l.tif", ids.astype(np.uint16))
    metrics = evaluate_files([pred], [label], tmp_path / "e", EvalOptions(num_classes=2, label_type="instances"))
    inst = metrics["images"][0]["instances"]
    assert (inst["true"], inst["predicted"], inst["tp"]) == (2, 1, 1)
    assert metrics["images"][0]["dice"]["foreground"] == 1.0


def test_evaluate_rejects_mismatched_files(tmp_path: Path) -> None:
    pred = _write(tmp_path / "p.tif", np.zeros((4, 5), np.uint8))
    label = _write(tmp_path / "l.tif", np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="l.tif"):
        evaluate_files([pred], [label], tmp_path / "e", EvalOptions())
    with pytest.raises(ValueError, match="counts must be equal"):
        evaluate_files([pred, pred], [label], tmp_path / "e", EvalOptions())


def test_training_labels_and_predictions_share_one_instance_rule() -> None:
    from unetdist.data.labels import to_instances
    from unetdist.data.synth import synth_image

    _, ids = synth_image(seed=3, index=1, height=120, width=120)
    three = instances_to_labels(ids, boundary=True)
    three[5, 5:8] = 1  # a boundary-only piece with no interior: its own object on both sides
    assert np.array_equal(to_instances(three, three, "classes", 3), label_instances(three, 3))
    two = (ids > 0).astype(np.uint8)
    assert np.array_equal(to_instances(two, two, "classes", 2), label_instances(two, 2))


def test_interior_probability_moves_the_split_between_touching_nuclei() -> None:
    labels = np.zeros((5, 12), np.uint8)
    labels[1:4, 1:11] = 1
    labels[2, 2], labels[2, 9] = 2, 2  # two seeds joined by boundary pixels
    prob = np.zeros(labels.shape, np.float32)
    prob[2, 2:9] = np.linspace(0.9, 0.1, 7)  # the left nucleus's interior reaches far to the right
    by_distance = label_instances(labels, 3)
    by_prob = label_instances(labels, 3, interior_prob=prob)
    assert by_distance.max() == by_prob.max() == 2
    assert by_distance[2, 7] == by_distance[2, 9], "nearest seed: column 7 is the right one's"
    assert by_prob[2, 7] == by_prob[2, 2], "following the probability: column 7 is the left one's"
