"""Dice, IoU and instance F1 against cases computed by hand, including empty prediction and empty truth."""

from __future__ import annotations

import numpy as np
import pytest

from unetdist.infer.evaluate import InstanceCounts, class_scores, confusion, match_instances


def _scores(pred: list[list[int]], true: list[list[int]], k: int = 2) -> dict:
    return class_scores(confusion(np.array(pred), np.array(true), k))


def test_dice_iou_small_case_by_hand() -> None:
    # class 1: tp = 2 (the right column), fp = 1 (bottom left), fn = 0
    # class 0: tp = 1 (top left), fp = 0, fn = 1
    s = _scores([[0, 1], [1, 1]], [[0, 1], [0, 1]])
    assert s["dice"]["class_1"] == pytest.approx(4 / 5) and s["iou"]["class_1"] == pytest.approx(2 / 3)
    assert s["dice"]["class_0"] == pytest.approx(2 / 3) and s["iou"]["class_0"] == pytest.approx(1 / 2)
    assert s["dice"]["foreground"] == s["dice"]["class_1"]


def test_three_classes_and_foreground() -> None:
    pred = [[0, 1, 2], [2, 2, 0]]
    true = [[0, 2, 2], [2, 1, 0]]
    s = _scores(pred, true, 3)
    # class 2: tp 2, fp 1 (row1 col1), fn 1 (row0 col1) -> dice 4/6; class 1: tp 0, fp 1, fn 1 -> 0
    assert s["dice"]["class_2"] == pytest.approx(4 / 6) and s["dice"]["class_1"] == 0.0
    # foreground (any non-zero): tp 4, fp 0, fn 0
    assert s["dice"]["foreground"] == 1.0 and s["iou"]["foreground"] == 1.0


def test_empty_prediction_empty_truth_and_both() -> None:
    truth = [[0, 1], [1, 0]]
    empty = [[0, 0], [0, 0]]
    assert _scores(empty, truth)["dice"]["foreground"] == 0.0  # missed everything
    assert _scores(truth, empty)["iou"]["class_1"] == 0.0  # found what is not there
    both = _scores(empty, empty)
    assert both["dice"]["class_1"] == 1.0 and both["iou"]["foreground"] == 1.0  # nothing to find, nothing found


def _squares(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    for number, (y, x, h, w) in enumerate(boxes, start=1):
        out[y:y + h, x:x + w] = number
    return out


def test_instance_f1_by_hand() -> None:
    true = _squares((20, 20), [(0, 0, 4, 4), (10, 10, 4, 4)])
    # object 1 exact (IoU 1); object 2 shifted by 3 columns: overlap 4x1 = 4, union 28 -> IoU 1/7; one extra object
    pred = _squares((20, 20), [(0, 0, 4, 4), (10, 13, 4, 4), (16, 0, 2, 2)])
    counts = match_instances(true, pred)
    assert (counts.tp, counts.fp, counts.fn) == (1, 2, 1)
    s = counts.scores()
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(2 / (2 + 2 + 1)) and s["mean_matched_iou"] == 1.0


def test_iou_of_exactly_half_matches() -> None:
    true = _squares((4, 8), [(0, 0, 4, 4)])
    pred = _squares((4, 8), [(0, 0, 4, 2)])  # inside, half the area: IoU 8/16
    assert match_instances(true, pred).tp == 1
    assert match_instances(true, pred, threshold=0.51).tp == 0


def test_matching_is_one_to_one() -> None:
    true = _squares((10, 10), [(0, 0, 4, 4), (0, 4, 4, 1)])  # a big and a thin object side by side
    pred = _squares((10, 10), [(0, 0, 4, 5)])  # one prediction covering both: IoU 16/20 with the big one
    counts = match_instances(true, pred)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 1)
    assert counts.matched_iou == [pytest.approx(0.8)]


def test_instance_scores_when_empty() -> None:
    objects = _squares((8, 8), [(1, 1, 3, 3)])
    nothing = np.zeros((8, 8), np.int32)
    none_found = match_instances(objects, nothing).scores()
    assert (none_found["precision"], none_found["recall"], none_found["f1"]) == (0.0, 0.0, 0.0)
    none_there = match_instances(nothing, objects).scores()
    assert (none_there["precision"], none_there["recall"], none_there["f1"]) == (0.0, 0.0, 0.0)
    empty = match_instances(nothing, nothing).scores()
    assert (empty["precision"], empty["recall"], empty["f1"]) == (1.0, 1.0, 1.0)


def test_pooled_counts_add_up() -> None:
    total = InstanceCounts(1, 2, 3, [0.9])
    total += InstanceCounts(4, 0, 1, [0.6, 0.7])
    assert (total.tp, total.fp, total.fn) == (5, 2, 4)
    assert total.scores()["f1"] == pytest.approx(10 / 16)
    assert total.scores()["mean_matched_iou"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differs"):
        confusion(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)


def test_optimal_matching_where_greedy_is_not_exact() -> None:
    """Below IoU 0.5 one object can overlap two: the best pair first (greedy) leaves one unmatched."""
    true, pred = np.zeros((1, 30), np.int32), np.zeros((1, 30), np.int32)
    true[0, :10], true[0, 10:20] = 1, 2
    pred[0, :3], pred[0, 3:16] = 1, 2  # IoUs: (1,1) 0.30, (1,2) 0.44, (2,2) 0.35
    counts = match_instances(true, pred, threshold=0.3)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0), "greedy would match (1,2) only"
    assert sorted(round(v, 2) for v in counts.matched_iou) == [0.3, 0.35]


def test_scores_at_every_threshold() -> None:
    from unetdist.infer.evaluate import THRESHOLDS, match_thresholds

    true, pred = np.zeros((1, 40), np.int32), np.zeros((1, 40), np.int32)
    true[0, :10], true[0, 20:30] = 1, 2
    pred[0, :10], pred[0, 22:30], pred[0, 35:38] = 1, 2, 3  # IoU 1.0, 0.8 and a false positive
    by = match_thresholds(true, pred)
    assert [by[t].tp for t in THRESHOLDS] == [2, 2, 2, 2, 1]
    assert by[0.9].scores()["ap"] == pytest.approx(1 / 4) and by[0.5].scores()["ap"] == pytest.approx(2 / 3)
    assert by[0.5].scores()["precision"] == pytest.approx(2 / 3) and by[0.9].scores()["recall"] == 0.5
