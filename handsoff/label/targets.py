"""A labeled set's labels at the labeler's resolution: which tasks it carries, resized exactly once.

Labels come at their image's size (`handsoff.data.labeled_set` checks that); the labeler works
at its label resolution R. Every image must be square (the generator's images are), of any
size: segmentation is resized with nearest-exact (pixel centres), depth bilinearly with its
invalid pixels (non-finite or <= 0) left out (normalised interpolation: a resized pixel is
valid when all of its bilinear support was), keypoints by scaling ``x, y`` by ``R / size``.
The latents of each image must encode the picture the generator renders at its own
resolution: aligning a real photo to that (crop, resize) is the inversion stage's job.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from handsoff.data.labeled_set import IMAGE_SUFFIXES, LabeledSet
from handsoff.errors import HandsoffError
from handsoff.label.model import TASKS

__all__ = ["LabelMaps", "carried_tasks", "check_latents", "resolve_tasks", "labels_at_resolution", "image_path",
           "valid_depth", "check_square"]

#: The meta.json keys of image-level class labels, which this labeler does not learn.
IMAGE_LABEL_KEYS = ("image_labels", "image_classes")


@dataclass(frozen=True)
class LabelMaps:
    """Labels of N images at resolution R (numpy).

    Attributes:
        seg: uint8 ``[N, R, R]`` (255 = ignore), or None.
        depth: float32 ``[N, R, R]``, NaN where invalid, or None.
        keypoints: float32 ``[N, K, 3]`` (x, y in label pixels, visible), or None.
        keypoint_known: bool ``[N, K]``: False for a keypoint whose visibility is unknown (its
            label was lost, e.g. by `handsoff.label.transfer`), which training skips; None = all known.
    """

    seg: Optional[np.ndarray]
    depth: Optional[np.ndarray]
    keypoints: Optional[np.ndarray]
    keypoint_known: Optional[np.ndarray] = None


def carried_tasks(labels: LabeledSet) -> dict[str, bool]:
    """Which of `TASKS` the set has labels for."""
    return {"seg": labels.seg is not None,
            "keypoints": labels.keypoints is not None and labels.keypoints.shape[1] > 0,
            "depth": labels.depth is not None}


def check_latents(G: torch.nn.Module, ws: torch.Tensor, labels: LabeledSet) -> None:
    """Refuse ``ws`` unless it is ``[len(labels), G.num_ws, G.w_dim]`` (one-line HandsoffError)."""
    if ws.ndim != 3 or tuple(ws.shape[1:]) != (G.num_ws, G.w_dim):
        raise HandsoffError(f"ws must be [N, {G.num_ws}, {G.w_dim}] for this generator, got {list(ws.shape)}")
    if ws.shape[0] != len(labels):
        raise HandsoffError(f"{labels.root}: {len(labels)} labeled images but {ws.shape[0]} latents")


def resolve_tasks(labels: LabeledSet, tasks: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The tasks to learn, in `TASKS` order: ``tasks`` checked against the set, or all it carries.

    Raises:
        HandsoffError: an unknown task, a task the set has no labels for, image-level class
            labels requested, or a set without any pixel labels.
    """
    carried = carried_tasks(labels)
    if tasks is None:
        if any(key in labels.meta for key in IMAGE_LABEL_KEYS):
            warnings.warn(f"{labels.root}: image-level class labels in meta.json are not learned (the hypercolumn "
                          "labeler labels pixels)", stacklevel=3)
        chosen = [t for t in TASKS if carried[t]]
        if not chosen:
            raise HandsoffError(f"{labels.root}: has no seg/, depth/ or keypoints.json to learn from")
        return tuple(chosen)
    for task in tasks:
        if task in ("image_class", "image_labels"):
            raise HandsoffError(f"{labels.root}: image-level class labels are not supported by the hypercolumn "
                                "labeler (it labels pixels); drop the task")
        if task not in TASKS:
            raise HandsoffError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        if not carried[task]:
            what = {"seg": "seg/ folder", "keypoints": "keypoints.json", "depth": "depth/ folder"}[task]
            raise HandsoffError(f"{labels.root}: task {task!r} requested but the set has no {what}")
    if not tasks:
        raise HandsoffError("no tasks requested")
    return tuple(t for t in TASKS if t in tasks)


def image_path(labels: LabeledSet, name: str) -> Path:
    """The image file of ``name`` in the set (for messages; the bare name under images/ when not found)."""
    for suffix in IMAGE_SUFFIXES:
        path = labels.root / "images" / f"{name}{suffix}"
        if path.exists():
            return path
    return labels.root / "images" / name


def _resize(array: np.ndarray, size: int, mode: str) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=(size, size), mode=mode, **kwargs)[0, 0].numpy()


def valid_depth(depth: np.ndarray) -> np.ndarray:
    """bool mask of the depth labels the labeler uses: finite and > 0 (0 marks "no depth here")."""
    return np.isfinite(depth) & (depth > 0)


def _resize_depth(depth: np.ndarray, size: int) -> np.ndarray:
    valid = valid_depth(depth).astype(np.float32)
    if depth.shape[0] == size:
        return np.where(valid > 0, depth, np.nan).astype(np.float32)
    weight = _resize(valid, size, "bilinear")
    total = _resize(np.where(valid > 0, depth, 0.0), size, "bilinear")
    return np.where(weight > 1 - 1e-4, total / np.maximum(weight, 1e-12), np.nan).astype(np.float32)


def check_square(labels: LabeledSet) -> None:
    """Refuse a set with a non-square image (one-line HandsoffError naming the image file)."""
    for name, image in zip(labels.names, labels.images):
        if image.shape[0] != image.shape[1]:
            raise HandsoffError(f"{image_path(labels, name)}: image is {image.shape[1]}x{image.shape[0]}; the "
                                "labeler needs square images like the generator's")


def labels_at_resolution(labels: LabeledSet, resolution: int, tasks: Sequence[str]) -> LabelMaps:
    """The labels of ``tasks`` resized to ``resolution`` (see the module docstring).

    Raises:
        HandsoffError: naming the image file when an image is not square.
    """
    check_square(labels)
    sizes = [image.shape[0] for image in labels.images]
    seg = depth = keypoints = None
    if "seg" in tasks:
        seg = np.stack([s if n == resolution else _resize(s, resolution, "nearest-exact").astype(np.uint8)
                        for s, n in zip(labels.seg, sizes)]).astype(np.uint8)
    if "depth" in tasks:
        depth = np.stack([_resize_depth(d, resolution) for d in labels.depth])
    if "keypoints" in tasks:
        keypoints = labels.keypoints.astype(np.float32).copy()
        keypoints[..., :2] *= np.asarray([resolution / n for n in sizes], np.float32)[:, None, None]
    return LabelMaps(seg, depth, keypoints)
