"""Pictures of labeled batches: image, segmentation overlay, depth and keypoints side by side."""
from __future__ import annotations

import math

import cv2
import numpy as np

from handsoff.domains.base import LabeledBatch
from handsoff.utils.images import image_grid

__all__ = ["PALETTE", "label_grid", "seg_colours", "depth_colours", "draw_keypoints"]

_BASE = np.array([
    [0, 0, 0], [230, 180, 140], [120, 70, 30], [40, 120, 255], [250, 220, 40], [255, 90, 60],
    [220, 30, 120], [60, 200, 90], [170, 110, 240], [30, 200, 210], [250, 250, 250],
    [140, 140, 0], [0, 90, 140], [200, 0, 0], [0, 140, 60], [110, 110, 110],
], dtype=np.uint8)


def _palette() -> np.ndarray:
    """256 fixed colours: hand-picked for the first 16 classes, then a deterministic spread; 255 white."""
    rest = np.random.default_rng(7).integers(40, 256, size=(256 - len(_BASE), 3), dtype=np.uint8)
    palette = np.concatenate([_BASE, rest])
    palette[255] = 255
    return palette


#: Colour of each class index (RGB uint8 ``[256, 3]``); 0 (background) is black, 255 (ignore) white.
PALETTE = _palette()


def seg_colours(image: np.ndarray, seg: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Class colours blended over the image (background left as a dimmed image). ``[H, W, 3]`` uint8."""
    colours = PALETTE[seg].astype(np.float32)
    weight = np.where(seg[..., None] == 0, 0.0, alpha)
    out = image.astype(np.float32) * (1.0 - weight) * np.where(seg[..., None] == 0, 0.5, 1.0) + colours * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def depth_colours(depth: np.ndarray, background: float | None = None) -> np.ndarray:
    """Depth as a turbo colour map, near = warm; ``background`` depth (default: the maximum) black."""
    far = float(depth.max()) if background is None else background
    fg = depth < far
    if not fg.any():
        return np.zeros((*depth.shape, 3), np.uint8)
    lo, hi = float(depth[fg].min()), float(depth[fg].max())
    level = np.clip((hi - depth) / max(hi - lo, 1e-6), 0, 1)
    coloured = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[:, :, ::-1]
    return np.where(fg[..., None], coloured, 0).astype(np.uint8)


def draw_keypoints(image: np.ndarray, keypoints: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Keypoints ``[K, 3]`` drawn on a copy of ``image``: visible filled, occluded hollow."""
    out = np.ascontiguousarray(image.copy())
    radius = max(2, int(round(2 * scale)))
    for k, (x, y, visible) in enumerate(keypoints):
        if not (0 <= x <= image.shape[1] / scale and 0 <= y <= image.shape[0] / scale):
            continue
        colour = tuple(int(c) for c in PALETTE[(k % 15) + 1])
        centre = (int(round(x * scale - 0.5)), int(round(y * scale - 0.5)))
        cv2.circle(out, centre, radius + 1, (0, 0, 0), -1 if visible else 2, cv2.LINE_AA)
        cv2.circle(out, centre, radius, colour, -1 if visible else 1, cv2.LINE_AA)
    return out


def _panels(batch: LabeledBatch, i: int, scale: int, background: float | None) -> list[np.ndarray]:
    def up(x: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)

    image = up(batch.images[i])
    return [image, up(seg_colours(batch.images[i], batch.seg[i])), up(depth_colours(batch.depth[i], background)),
            draw_keypoints(image, batch.keypoints[i], scale)]


def label_grid(batch: LabeledBatch, max_items: int = 16, per_row: int = 4, min_tile: int = 128,
               background_depth: float | None = None) -> np.ndarray:
    """One picture of a batch: per sample the image, seg overlay, depth and keypoints.

    Args:
        batch: the samples; the first ``max_items`` are shown.
        max_items: how many samples.
        per_row: samples per row of the grid (each sample is four panels wide).
        min_tile: panels are upscaled (nearest) by an integer factor to at least this size.
        background_depth: depth drawn black (default: each map's maximum).

    Returns:
        uint8 ``[H, W, 3]`` RGB.
    """
    count = min(len(batch), max_items)
    if count == 0:
        raise ValueError("label_grid: empty batch")
    size = batch.images.shape[1]
    scale = max(1, math.ceil(min_tile / size))
    tiles = []
    for i in range(count):
        panels = _panels(batch, i, scale, background_depth)
        gap = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1))
    return image_grid(np.stack(tiles), cols=min(per_row, count), pad=6)
