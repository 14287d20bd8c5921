"""What each downstream task trains on, how it is decoded, and how it is scored.

One `Task` per label kind; `TASKS` maps the command-line names to them.

* ``seg``: one logit per class; cross-entropy plus soft Dice (the nnU-Net recipe: Dice
  weighs every class alike, so small parts are learnt too), pixels labelled 255 ignored;
  prediction = argmax. Scored by mIoU, per-class IoU and pixel accuracy (`handsoff.metrics`).
* ``keypoints``: one heatmap per keypoint. Training treats each heatmap as a distribution
  over pixels (softmax over H x W) and minimises its KL divergence from a Gaussian
  centred on the keypoint (sigma = max(1, 0.02 * max(H, W)) pixels), for visible keypoints
  only (column 3 >= 0.5, `handsoff.data.folder_dataset.VISIBLE_THRESHOLD`). Decoding:
  argmax pixel, refined by a soft-argmax over the probabilities of its 5x5 neighbourhood
  (sub-pixel, and immune to stray mass far from the peak that a global soft-argmax would
  average in). Scored by PCK@0.05 and PCK@0.1 of the image size, over visible test points.
* ``depth``: one channel, read as log depth; L1 loss on log depth over pixels with a finite,
  positive target (augmentation padding is NaN), background included, so the model learns
  where the subject ends. The raw output is standardised (log depth = std * out + mean,
  mean and std of log depth over up to 256 training samples), so training starts at the
  right scale. Prediction = exp(log depth). Scored by RMSE, AbsRel and
  delta<1.25 over foreground pixels (test seg not 0 and not 255) when the test set has
  segmentation, else over every pixel with a finite positive depth (the built-in domain's
  background sits at a constant 10.0, which would dominate the figures).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.nn import functional as F

from handsoff import metrics
from handsoff.data.folder_dataset import VISIBLE_THRESHOLD
from handsoff.data.labeled_set import IGNORE_INDEX

__all__ = ["Task", "TASKS", "PCK_THRESHOLDS", "heatmap_targets", "decode_heatmaps", "soft_dice_loss", "score"]

PCK_THRESHOLDS = (0.05, 0.1)


@dataclass(frozen=True)
class Task:
    """A downstream task.

    Attributes:
        name: 'seg', 'keypoints' or 'depth' (also the dataset item key of its labels).
        label_folder: how a labeled-set folder holds the labels (for error messages).
        loss: ``(output [N, C, H, W], target) -> scalar`` training loss.
        predict: ``output -> numpy prediction`` (class map, keypoints ``[N, K, 2]`` or depth).
        primary: the headline metric and whether higher is better.
        calibrate: ``targets -> (scale, shift)`` for the model's raw output (``scale * out +
            shift``), from a sample of training targets, or None (outputs used as they are).
        supervised: ``targets -> bool mask`` of the labels that carry a training signal
            (labelled pixels, valid depths, visible keypoints); its mean over training is
            recorded, and a training set where it is 0 trains nothing.
    """

    name: str
    label_folder: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor], np.ndarray]
    primary: tuple[str, bool]
    supervised: Callable[[torch.Tensor], torch.Tensor]
    calibrate: Optional[Callable[[torch.Tensor], tuple[float, float]]] = None

    def out_channels(self, classes: tuple[str, ...], keypoint_names: tuple[str, ...]) -> int:
        """Output channels of the model: classes, keypoints (one heatmap each) or 1."""
        return {"seg": len(classes), "keypoints": len(keypoint_names), "depth": 1}[self.name]

    def target(self, items: list[dict[str, torch.Tensor]], size: tuple[int, int]) -> torch.Tensor:
        """Stack the items' labels for this task at image size ``size`` (H, W).

        Shards may store seg and depth at a lower label resolution than their images;
        such maps are resized to the image (nearest: classes and depths stay unmixed).
        """
        stacked = torch.stack([item[self.name] for item in items])
        if self.name == "keypoints" or tuple(stacked.shape[-2:]) == tuple(size):
            return stacked
        return F.interpolate(stacked[:, None].float(), size=size, mode="nearest")[:, 0].to(stacked.dtype)


# --------------------------------------------------------------------------------------- seg
def soft_dice_loss(output: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the classes, computed over the whole batch (pixels labelled 255 left out).

    Every class counts alike however few pixels it has, which is what lets small parts
    (eyes: 0.25% of the pixels) be learnt within a short schedule; ``eps`` keeps classes
    absent from the batch from dominating.
    """
    probs = torch.softmax(output.float(), 1)
    valid = target != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, target, 0), output.shape[1]).permute(0, 3, 1, 2).float()
    mask = valid[:, None].float()
    probs, onehot = probs * mask, onehot * mask
    dims = (0, 2, 3)
    dice = (2 * (probs * onehot).sum(dims) + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return 1 - dice.mean()


def _seg_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, ignore_index=IGNORE_INDEX) + soft_dice_loss(output, target)


def _seg_predict(output: torch.Tensor) -> np.ndarray:
    return output.argmax(1).to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------------- keypoints
def _sigma(h: int, w: int) -> float:
    return max(1.0, 0.02 * max(h, w))


def heatmap_targets(keypoints: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Normalised Gaussian target distributions ``[N, K, H*W]`` for keypoints ``[N, K, >=2]``.

    Pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``; every row sums to 1.
    """
    ys = torch.arange(h, dtype=torch.float32, device=keypoints.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=keypoints.device) + 0.5
    dx = (xs[None, None, None, :] - keypoints[..., 0, None, None]) ** 2
    dy = (ys[None, None, :, None] - keypoints[..., 1, None, None]) ** 2
    logits = -(dx + dy) / (2 * _sigma(h, w) ** 2)
    return torch.softmax(logits.reshape(*keypoints.shape[:2], h * w), -1)


def _keypoint_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    n, k, h, w = output.shape
    visible = target[..., 2] >= VISIBLE_THRESHOLD
    if not visible.any():
        return output.sum() * 0.0  # keeps the graph (and the step) valid for a batch without points
    log_p = torch.log_softmax(output.reshape(n, k, h * w), -1)
    q = heatmap_targets(target, h, w)
    # KL(q || p) = cross-entropy minus the target's own entropy: same gradients, and 0 at a perfect fit.
    kl = (q * (torch.log(q.clamp_min(1e-30)) - log_p)).sum(-1)
    return kl[visible].mean()


def decode_heatmaps(output: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Keypoints ``[N, K, 2]`` (x, y in pixels) from heatmap logits ``[N, K, H, W]``.

    The argmax pixel, refined by the probability-weighted mean of pixel centres over its
    ``(2 radius + 1)``-square neighbourhood (cut at the border, which pulls points within
    about a sigma of the border inward by up to a pixel).
    """
    n, k, h, w = output.shape
    prob = torch.softmax(output.reshape(n, k, h * w).float(), -1).reshape(n, k, h, w)
    flat = prob.reshape(n, k, h * w).argmax(-1)
    row, col = flat // w, flat % w
    offsets = torch.arange(-radius, radius + 1, device=output.device)
    side = len(offsets)
    rows, cols = row[..., None] + offsets, col[..., None] + offsets  # [N, K, side]
    inside = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    nk = torch.arange(n * k, device=output.device)
    patch = prob.reshape(n * k, h, w)[nk[:, None, None], rows.reshape(-1, side)[:, :, None],
                                       cols.reshape(-1, side)[:, None, :]].reshape(n, k, side, side)
    patch = patch * inside  # a neighbour outside the map (clamped onto the border) adds nothing
    mass = patch.sum((-1, -2)).clamp_min(1e-12)
    y = (patch.sum(-1) * (rows.float() + 0.5)).sum(-1) / mass
    x = (patch.sum(-2) * (cols.float() + 0.5)).sum(-1) / mass
    return torch.stack([x, y], -1)


def _keypoint_predict(output: torch.Tensor) -> np.ndarray:
    return decode_heatmaps(output).cpu().numpy()


# ------------------------------------------------------------------------------------- depth
def _valid_depth(target: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(target) & (target > 0)


def _depth_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    valid = _valid_depth(target)
    if not valid.any():
        return output.sum() * 0.0
    return (output[:, 0][valid] - torch.log(target[valid])).abs().mean()


def _depth_calibrate(target: torch.Tensor) -> tuple[float, float]:
    """Standardise log depth: a fresh model then starts at the mean depth with unit-scale steps."""
    logs = torch.log(target[_valid_depth(target)].double())
    if logs.numel() < 2:
        return 1.0, 0.0
    return max(float(logs.std()), 1e-3), float(logs.mean())


def _depth_predict(output: torch.Tensor) -> np.ndarray:
    return torch.exp(output[:, 0].float()).cpu().numpy()


# ----------------------------------------------------------------------------------- scoring
def score(task: Task, predictions: np.ndarray, test: dict[str, Optional[np.ndarray]],
          classes: tuple[str, ...], size: tuple[int, int]) -> dict[str, Any]:
    """The task's metrics of ``predictions`` against the stacked test labels ``test``.

    Args:
        task: the task.
        predictions: `Task.predict` outputs of the whole test set, concatenated.
        test: ``{"seg": [N, H, W] or None, "depth": ..., "keypoints": ...}``.
        classes: class names (seg).
        size: ``(H, W)`` of the test images.
    """
    if task.name == "seg":
        confusion = metrics.confusion_matrix(predictions, test["seg"], len(classes), IGNORE_INDEX)
        return metrics.segmentation_scores(confusion, classes)
    if task.name == "keypoints":
        return {f"pck@{t:g}": metrics.pck(predictions, test["keypoints"], t, size) for t in PCK_THRESHOLDS}
    seg = test.get("seg")
    mask = None if seg is None else (seg != 0) & (seg != IGNORE_INDEX)
    result = metrics.depth_scores(predictions, test["depth"], mask)
    result["scored_pixels"] = "foreground (test seg != 0)" if mask is not None else "all pixels with depth > 0"
    return result


TASKS: dict[str, Task] = {
    "seg": Task("seg", "seg/", _seg_loss, _seg_predict, ("miou", True), lambda t: t != IGNORE_INDEX),
    "keypoints": Task("keypoints", "keypoints.json", _keypoint_loss, _keypoint_predict, ("pck@0.05", True),
                      lambda t: t[..., 2] >= VISIBLE_THRESHOLD),
    "depth": Task("depth", "depth/", _depth_loss, _depth_predict, ("rmse", False), _valid_depth, _depth_calibrate),
}
