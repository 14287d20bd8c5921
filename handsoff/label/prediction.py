"""What a labeler returns for a batch of images: the contract between `label` and `synth`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["LabelPrediction"]


@dataclass
class LabelPrediction:
    """Labels and uncertainties for N images of size H x W (numpy, on the CPU).

    Attributes:
        seg: uint8 ``[N, H, W]`` class index (argmax of the ensemble's mean probability), or
            None when the labeler has no segmentation head.
        keypoints: float32 ``[N, K, 3]``: x, y in pixels (pixel (i, j) covers
            ``[j, j+1) x [i, i+1)``) and a confidence in [0, 1], or None.
        depth: float32 ``[N, H, W]`` (ensemble mean), or None.
        uncertainty: float32 ``[N]``: the image score used for filtering (higher = less
            certain). With segmentation: the mean of the top 10% of per-pixel Jensen-Shannon
            divergences across members (HandsOff/DatasetGAN); without: the mean of the other
            scores.
        scores: float32 ``[N]`` per-task scores, e.g. ``{"seg_js": ..., "keypoints_spread": ...,
            "depth_spread": ...}``.
        seg_uncertainty: float32 ``[N, H, W]`` per-pixel JS divergence, or None.
    """

    uncertainty: np.ndarray
    seg: Optional[np.ndarray] = None
    keypoints: Optional[np.ndarray] = None
    depth: Optional[np.ndarray] = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    seg_uncertainty: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.uncertainty.shape[0])
