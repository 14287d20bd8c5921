"""Labeling generated images: one call from latents to images, labels and uncertainties."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from handsoff.label.model import HypercolumnLabeler
from handsoff.label.prediction import LabelPrediction

__all__ = ["synthesis_chunks", "images_at", "label_ws"]


def synthesis_chunks(G: torch.nn.Module, ws: Tensor, *, batch_size: Optional[int] = None, noise_mode: str = "const",
                     impl: str = "auto") -> Iterator[tuple[int, Tensor, list[Tensor]]]:
    """``(start, images, features)`` of ``G.synthesis(ws[start:start+b], return_features=True)`` chunk by chunk.

    Args:
        G: the generator.
        ws: ``[N, num_ws, w_dim]`` (moved to G's device).
        batch_size: images per call; None = all at once.
        noise_mode, impl: passed to ``G.synthesis``.
    """
    device = next(G.parameters()).device
    step = batch_size or max(1, ws.shape[0])
    with torch.no_grad():
        for start in range(0, ws.shape[0], step):
            images, features = G.synthesis(ws[start:start + step].to(device), noise_mode=noise_mode, impl=impl,
                                           return_features=True)
            yield start, images, features


def images_at(images: Tensor, resolution: int) -> np.ndarray:
    """Generator images ``[N, 3, H, W]`` (about [-1, 1]) as uint8 ``[N, R, R, 3]`` at the label resolution.

    Resized with antialiased bilinear interpolation when R differs from H (area-like when
    shrinking, plain bilinear when enlarging), then converted by `handsoff.utils.images.to_uint8`.
    """
    from handsoff.utils.images import to_uint8

    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                               antialias=True)
    return to_uint8(images)


def label_ws(G: torch.nn.Module, labeler: HypercolumnLabeler, ws: Tensor, *, noise_mode: str = "const",
             impl: str = "auto", batch_size: Optional[int] = None) -> tuple[np.ndarray, LabelPrediction]:
    """Synthesize ``ws`` with features and label them.

    Args:
        G: the generator the labeler was trained for.
        labeler: a trained `HypercolumnLabeler` (any device; features are moved to it).
        ws: ``[N, num_ws, w_dim]``.
        noise_mode: ``G.synthesis`` noise (the labeler was trained on 'const' features).
        impl: ``stylegan_ops`` implementation for ``G.synthesis``.
        batch_size: images per generator call (None = all at once; memory grows with it).

    Returns:
        ``(images, prediction)``: uint8 ``[N, R, R, 3]`` images at the label resolution R (see
        `images_at`) and the `LabelPrediction` of the N images.
    """
    resolution = labeler.config.label_resolution
    images, parts = [], []
    for _, batch, features in synthesis_chunks(G, ws, batch_size=batch_size, noise_mode=noise_mode, impl=impl):
        images.append(images_at(batch, resolution))
        parts.append(labeler.predict(features))
    return np.concatenate(images), _concat(parts)


def _concat(parts: list[LabelPrediction]) -> LabelPrediction:
    """One `LabelPrediction` from several of the same labeler, in order."""
    if len(parts) == 1:
        return parts[0]

    def join(field: str) -> Optional[np.ndarray]:
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return LabelPrediction(uncertainty=join("uncertainty"), seg=join("seg"), keypoints=join("keypoints"),
                           depth=join("depth"), seg_uncertainty=join("seg_uncertainty"),
                           scores={key: np.concatenate([p.scores[key] for p in parts]) for key in parts[0].scores})
