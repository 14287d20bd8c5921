"""Label-quality metrics shared by every stage that scores labels (labeler, bench).

All functions take whole sets as numpy arrays (the sets here are small: at most a few
thousand images at 64-256 px) and return plain floats, so they can go into JSON as they are.

Conventions:
    * segmentation: integer class maps ``[N, H, W]``; ``ignore_index`` pixels of the target
      are not scored. mIoU averages the classes that occur in the target or the prediction
      (union > 0); classes absent from both are left out (reported as None per class).
    * keypoints: PCK@t counts a visible target keypoint as correct when the predicted point is
      within ``t * max(H, W)`` pixels of it (normalised by the image size, not a bounding box,
      because every image of a set has one size and the built-in domain has no boxes).
      Invisible target points are not scored.
    * depth: RMSE, AbsRel = mean(|p - t| / t) and delta<1.25 = fraction with
      max(p / t, t / p) < 1.25, over the pixels of ``mask`` (default: every finite t > 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["confusion_matrix", "segmentation_scores", "pck", "depth_scores"]


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = target class, columns = predicted class."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size: {pred.size} vs {target.size}")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred = np.clip(pred[keep], 0, num_classes - 1)
    return np.bincount(target[keep] * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray, class_names: Optional[Sequence[str]] = None) -> dict:
    """mIoU, per-class IoU and pixel accuracy from a confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = confusion.sum()
    return {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
    }


def pck(pred: np.ndarray, target: np.ndarray, threshold: float, size: tuple[int, int]) -> float:
    """Fraction of visible target keypoints predicted within ``threshold * max(size)`` pixels.

    Args:
        pred: ``[N, K, >=2]`` predicted x, y (further columns ignored).
        target: ``[N, K, 3]`` x, y, visible.
        threshold: e.g. 0.05 or 0.1.
        size: ``(H, W)`` of the images.
    """
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    visible = target[..., 2] > 0.5
    if not visible.any():
        return float("nan")
    dist = np.linalg.norm(pred[..., :2] - target[..., :2], axis=-1)
    return float((dist[visible] <= threshold * max(size)).mean())


def depth_scores(pred: np.ndarray, target: np.ndarray, mask: Optional[np.ndarray] = None) -> dict:
    """RMSE, AbsRel and delta<1.25 of ``pred`` against ``target`` over ``mask``."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    valid = np.isfinite(target) & (target > 0)
    if mask is not None:
        valid &= np.asarray(mask, bool)
    if not valid.any():
        return {"rmse": float("nan"), "absrel": float("nan"), "delta1": float("nan")}
    p, t = pred[valid], target[valid]
    ratio = np.maximum(p / t, t / np.maximum(p, 1e-12))
    return {
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "absrel": float(np.mean(np.abs(p - t) / t)),
        "delta1": float(np.mean((p > 0) & (ratio < 1.25))),
    }
