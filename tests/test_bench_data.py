"""Metrics on hand-made arrays and the labeled-folder dataset's augmentation (handsoff.bench, issue 7)."""
import math

import numpy as np
import pytest
import torch

from handsoff import metrics
from handsoff.bench.tasks import TASKS, decode_heatmaps, heatmap_targets, score
from handsoff.data.folder_dataset import (Augmentation, LabeledFolderDataset, draw_augmentation,
                                          mirror_permutation)
from handsoff.data.labeled_set import read_labeled_set, write_labeled_set
from handsoff.domains import LabeledBatch
from handsoff.errors import HandsoffError


# ------------------------------------------------------------------------------------ metrics
def test_perfect_predictions_score_perfectly():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, size=(3, 8, 8))
    scores = metrics.segmentation_scores(metrics.confusion_matrix(seg, seg, 4), ["a", "b", "c", "d"])
    assert scores["miou"] == 1.0 and scores["pixel_accuracy"] == 1.0
    kp = np.concatenate([rng.uniform(0, 8, size=(3, 5, 2)), np.ones((3, 5, 1))], -1)
    assert metrics.pck(kp, kp, 0.05, (8, 8)) == 1.0
    depth = rng.uniform(1, 10, size=(3, 8, 8))
    assert metrics.depth_scores(depth, depth) == {"rmse": 0.0, "absrel": 0.0, "delta1": 1.0}


def test_known_partial_scores():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    scores = metrics.segmentation_scores(metrics.confusion_matrix(pred, target, 3), ["bg", "fg", "never"])
    # bg: 1 / 2, fg: 2 / 3; class 2 occurs nowhere and is left out of the mean.
    assert scores["per_class_iou"] == {"bg": 0.5, "fg": pytest.approx(2 / 3), "never": None}
    assert scores["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    # Ignored pixels (255) are not scored.
    assert metrics.confusion_matrix(np.array([1, 1]), np.array([255, 1]), 2).sum() == 1

    target_kp = np.array([[[10.0, 10.0, 1], [20.0, 20.0, 1], [0.0, 0.0, 0]]])
    pred_kp = np.array([[[12.0, 10.0], [20.0, 26.0], [50.0, 50.0]]])  # 2 px and 6 px off; the third is invisible
    assert metrics.pck(pred_kp, target_kp, 0.05, (64, 64)) == 0.5   # 3.2 px
    assert metrics.pck(pred_kp, target_kp, 0.1, (64, 64)) == 1.0    # 6.4 px

    d = metrics.depth_scores(np.array([2.0, 4.0]), np.array([2.0, 2.0]))
    assert d["rmse"] == pytest.approx(math.sqrt(2.0)) and d["absrel"] == 0.5 and d["delta1"] == 0.5


def test_depth_task_scores_foreground_only():
    target = np.full((1, 2, 2), 10.0, np.float32)
    target[0, 0, 0] = 5.0
    seg = np.zeros((1, 2, 2), np.uint8)
    seg[0, 0, 0] = 1
    pred = np.full((1, 2, 2), 3.0, np.float32)
    pred[0, 0, 0] = 5.0  # right on the foreground, wrong on the background
    scores = score(TASKS["depth"], pred, {"seg": seg, "depth": target, "keypoints": None}, ("bg", "fg"), (2, 2))
    assert scores["rmse"] == 0.0 and scores["delta1"] == 1.0


def test_heatmap_decode_recovers_subpixel_points():
    points = torch.tensor([[[3.3, 5.7, 1.0], [10.0, 2.5, 1.0], [0.4, 15.8, 1.0]]])
    logits = torch.log(heatmap_targets(points, 16, 16)).reshape(1, 3, 16, 16)
    decoded = decode_heatmaps(logits)
    assert torch.allclose(decoded[:, :2], points[:, :2, :2], atol=0.1)
    # At the border the heatmap itself is cut off, which pulls the estimate inward, by less than a pixel.
    assert torch.allclose(decoded[:, 2], points[:, 2, :2], atol=1.0)


# --------------------------------------------------------------------------- folder dataset
def test_mirror_permutation_pairs_sides():
    assert mirror_permutation(["right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left"]) == [1, 0, 2, 4, 3]
    assert mirror_permutation(["l_ear", "r_ear", "Left-Hand", "Right-Hand", "chin"]) == [1, 0, 3, 2, 4]
    assert mirror_permutation(["leftover", "rightmost"]) == [0, 1]  # whole tokens only


BLOCK = 4
CLASSES = ["background", "left_part", "right_part", "middle"]
KP_NAMES = ["left_dot", "right_dot", "centre"]
KP_CLASS = {"left_dot": "left_part", "right_dot": "right_part", "centre": "middle"}


def _block_set(tmp_path):
    """A 16x16 image of 4x4 blocks: each block's class, colour and depth agree; keypoints at block centres."""
    block_classes = np.array([[0, 0, 0, 0], [0, 1, 3, 2], [0, 3, 3, 3], [0, 0, 1, 0]], np.uint8)
    seg = np.kron(block_classes, np.ones((BLOCK, BLOCK), np.uint8))
    palette = np.array([[0, 0, 200], [200, 0, 0], [0, 200, 0], [200, 200, 0]], np.uint8)
    depth = (seg + 1).astype(np.float32)
    # left_dot on the left_part block (row 1, col 1), right_dot on right_part (1, 3), centre on middle (2, 2).
    kp = np.array([[6.0, 6.0, 1], [14.0, 6.0, 1], [10.0, 10.0, 1]], np.float32)
    batch = LabeledBatch(palette[seg][None], seg[None], depth[None], kp[None], ["a"])
    path = write_labeled_set(batch, tmp_path / "blocks", {"classes": CLASSES, "keypoint_names": KP_NAMES})
    return path, palette


def test_flip_mirrors_image_labels_and_swaps_sides(tmp_path):
    path, _ = _block_set(tmp_path)
    ds = LabeledFolderDataset(path)
    plain, flipped = ds.sample(0), ds.sample(0, Augmentation(flip=True))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["depth"], plain["depth"].flip(-1))
    swap = torch.tensor([0, 2, 1, 3])  # left_part <-> right_part
    assert torch.equal(flipped["seg"], swap[plain["seg"].flip(-1)])
    # left_dot of the mirrored image is the mirror of right_dot: x -> W - x.
    expected = torch.tensor([[16 - 14.0, 6.0, 1], [16 - 6.0, 6.0, 1], [16 - 10.0, 10.0, 1]])
    assert torch.equal(flipped["keypoints"], expected)
    # The mirrored left_dot sits on a left_part pixel again.
    x, y = flipped["keypoints"][0, :2].long()
    assert CLASSES[int(flipped["seg"][y, x])] == "left_part"


def test_random_augmentations_keep_labels_consistent(tmp_path):
    path, palette = _block_set(tmp_path)
    ds = LabeledFolderDataset(path, augment=True, seed=3)
    plain = ds.sample(0)
    class_swap = torch.tensor(mirror_permutation(CLASSES) + [0] * 251 + [255])
    kp_swap = mirror_permutation(KP_NAMES)
    rng = np.random.default_rng(0)
    for _ in range(25):
        aug = draw_augmentation(ds.image_size, rng)
        aug = Augmentation(aug.flip, aug.scale, aug.offset)  # no colour jitter: colours identify the blocks
        item = ds.sample(0, aug)
        seg, depth, image = item["seg"], item["depth"], item["image"].permute(1, 2, 0)
        padded = seg == 255
        assert torch.equal(torch.isnan(depth), padded)  # depth and seg share the transform
        # The block a pixel shows, before any left/right renaming of classes.
        block = class_swap[seg] if aug.flip else seg
        assert torch.equal(depth[~padded], (block[~padded] + 1).float())
        for k, (x, y, visible) in enumerate(item["keypoints"].tolist()):
            assert visible == (0.0 <= x <= 16 and 0.0 <= y <= 16)
            if not visible:
                continue
            source = kp_swap[k] if aug.flip else k  # the original keypoint this one is the image of
            sx, sy = plain["keypoints"][source, :2].long()
            original = int(plain["seg"][sy, sx])
            assert int(block[int(y), int(x)]) == original
            assert np.array_equal(image[int(y), int(x)].numpy(), palette[original])
            # Names follow sides: left_dot lies on left_part, flipped or not.
            assert CLASSES[int(seg[int(y), int(x)])] == KP_CLASS[KP_NAMES[k]]


def test_augmentation_is_seeded_and_jitters_colour(tmp_path):
    path, _ = _block_set(tmp_path)
    a, b = LabeledFolderDataset(path, augment=True, seed=1), LabeledFolderDataset(path, augment=True, seed=1)
    draws_a, draws_b = [a[0] for _ in range(4)], [b[0] for _ in range(4)]
    for x, y in zip(draws_a, draws_b):
        assert all(torch.equal(x[k], y[k]) or torch.isnan(x[k]).any() for k in x)
    assert not all(torch.equal(draws_a[0]["image"], d["image"]) for d in draws_a[1:])
    assert set(draws_a[0]) == {"image", "seg", "depth", "keypoints", "uncertainty", "seed"}
    assert draws_a[0]["seg"].dtype == torch.int64 and draws_a[0]["image"].dtype == torch.uint8


def test_images_of_two_sizes_are_refused(tmp_path):
    path, _ = _block_set(tmp_path)
    ls = read_labeled_set(path)
    ls.images.append(np.zeros((8, 8, 3), np.uint8))
    ls.names.append("b")
    with pytest.raises(HandsoffError, match="blocks: images differ in size"):
        LabeledFolderDataset(ls)
