"""handsoff.metrics on hand-made cases whose answers are known."""
import math

import numpy as np
import pytest

from handsoff.metrics import confusion_matrix, depth_scores, pck, segmentation_scores


def test_perfect_segmentation_scores_one():
    target = np.array([[[0, 1], [2, 2]]], dtype=np.uint8)
    scores = segmentation_scores(confusion_matrix(target, target, 4), ["a", "b", "c", "d"])
    assert scores["miou"] == 1.0 and scores["pixel_accuracy"] == 1.0
    assert scores["per_class_iou"] == {"a": 1.0, "b": 1.0, "c": 1.0, "d": None}


def test_partial_segmentation_and_ignore():
    target = np.array([0, 0, 1, 1, 255])
    pred = np.array([0, 1, 1, 1, 0])
    conf = confusion_matrix(pred, target, 2)
    assert conf.tolist() == [[1, 1], [0, 2]]  # the ignored pixel is not counted
    scores = segmentation_scores(conf)
    assert scores["per_class_iou"] == {"0": 0.5, "1": pytest.approx(2 / 3)}
    assert scores["miou"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_confusion_matrix_refuses_mismatched_sizes():
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)


def test_pck_counts_visible_points_within_threshold():
    target = np.array([[[10, 10, 1], [20, 20, 1], [0, 0, 0]]], dtype=np.float32)
    pred = np.array([[[10, 13, 1], [30, 20, 1], [50, 50, 1]]], dtype=np.float32)
    assert pck(pred, target, 0.05, (64, 64)) == 0.5   # 3 px <= 3.2 px, 10 px is not; invisible skipped
    assert pck(pred, target, 0.2, (64, 64)) == 1.0
    assert math.isnan(pck(pred, target * [1, 1, 0], 0.1, (64, 64)))


def test_depth_scores():
    target = np.array([1.0, 2.0, 4.0, 10.0])
    assert depth_scores(target, target) == {"rmse": 0.0, "absrel": 0.0, "delta1": 1.0}
    pred = np.array([1.0, 3.0, 4.0, 0.0])
    mask = np.array([True, True, True, False])
    scores = depth_scores(pred, target, mask)
    assert scores["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert scores["absrel"] == pytest.approx(0.5 / 3)
    assert scores["delta1"] == pytest.approx(2 / 3)   # 3/2 = 1.5 is outside 1.25
