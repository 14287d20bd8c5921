"""Scoring a labeler against labeled images given by their latents (`handsoff.metrics`)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from handsoff.data.labeled_set import IGNORE_INDEX, LabeledSet
from handsoff.errors import HandsoffError
from handsoff.label.infer import label_ws
from handsoff.label.model import HypercolumnLabeler
from handsoff.label.targets import carried_tasks, check_latents, labels_at_resolution
from handsoff.metrics import confusion_matrix, depth_scores, pck, segmentation_scores

__all__ = ["PCK_THRESHOLDS", "evaluate_labeler"]

PCK_THRESHOLDS = (0.05, 0.1)


def _check_names(labels: LabeledSet, what: str, ours: tuple[str, ...], theirs: tuple[str, ...]) -> None:
    if ours != theirs:
        raise HandsoffError(f"{labels.root}: {what} {list(theirs)} differ from the labeler's {list(ours)}")


def evaluate_labeler(G: torch.nn.Module, labeler: HypercolumnLabeler, ws: Tensor, labels: LabeledSet, *,
                     batch_size: Optional[int] = 8) -> dict[str, Any]:
    """Label ``ws`` and score the labels against ``labels`` at the labeler's label resolution.

    Scores every task that both the labeler and the set have (labels resized as for training,
    `handsoff.label.targets`):

    * ``seg``: mIoU, per-class IoU, pixel accuracy (pixels labeled 255 ignored);
    * ``keypoints``: ``pck@0.05`` and ``pck@0.1`` (visible target keypoints; threshold times
      the label resolution);
    * ``depth``: RMSE, AbsRel, delta1 over the foreground (target class != 0) when the set
      has segmentation, else over every pixel with a valid depth.

    Args:
        G: the generator.
        labeler: the labeler (trained for G).
        ws: ``[N, num_ws, w_dim]``, row i the latents of ``labels.names[i]``.
        labels: the labeled set.
        batch_size: images per generator call.

    Returns:
        ``{"images": N, "label_resolution": R, "tasks": [...], "seg": {...}, "keypoints": {...},
        "depth": {...}, "uncertainty_mean": float}`` (task entries only for scored tasks).

    Raises:
        HandsoffError: ws does not fit G or the labels, class or keypoint names differ, or
            the set shares no task with the labeler.
    """
    cfg = labeler.config
    check_latents(G, ws, labels)
    carried = carried_tasks(labels)
    tasks = [t for t in cfg.tasks if carried[t]]
    if not tasks:
        raise HandsoffError(f"{labels.root}: has none of the labeler's tasks ({', '.join(cfg.tasks)})")
    if "seg" in tasks:
        _check_names(labels, "classes", cfg.classes, labels.classes)
    if "keypoints" in tasks:
        _check_names(labels, "keypoint names", cfg.keypoint_names, labels.keypoint_names)
    r = cfg.label_resolution
    maps = labels_at_resolution(labels, r, tasks + (["seg"] if carried["seg"] and "seg" not in tasks else []))
    _, pred = label_ws(G, labeler, ws, batch_size=batch_size)
    result: dict[str, Any] = {"images": len(labels), "label_resolution": r, "tasks": tasks,
                              "uncertainty_mean": float(np.mean(pred.uncertainty))}
    if "seg" in tasks:
        confusion = confusion_matrix(pred.seg, maps.seg, cfg.num_classes, ignore_index=IGNORE_INDEX)
        result["seg"] = segmentation_scores(confusion, cfg.classes)
    if "keypoints" in tasks:
        result["keypoints"] = {f"pck@{t:g}": pck(pred.keypoints, maps.keypoints, t, (r, r)) for t in PCK_THRESHOLDS}
    if "depth" in tasks:
        mask = None if maps.seg is None else (maps.seg != 0) & (maps.seg != IGNORE_INDEX)
        result["depth"] = {**depth_scores(pred.depth, maps.depth, mask),
                           "pixels": "foreground (seg != 0)" if mask is not None else "all"}
    return result
