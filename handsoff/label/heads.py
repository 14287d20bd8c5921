"""The task heads: targets and losses for training, decoding and uncertainty for inference.

One labeler carries every head; its last layer outputs, per pixel and member, the channels of
all tasks side by side (`LabelerConfig.task_slices`): ``C`` segmentation logits, ``K``
keypoint-heatmap logits, 1 depth value.

Segmentation
    Cross-entropy; pixels labeled 255 are ignored. Per pixel the ensemble's class is the argmax
    of the mean softmax; its uncertainty is the Jensen-Shannon divergence across members,
    ``H(mean_k p_k) - mean_k H(p_k)`` (natural log), the definition in the HandsOff/DatasetGAN
    papers (the official DatasetGAN code takes the entropy of the mean *logits* instead). The
    image score is the mean of the top 10% of pixel values (``max(1, H*W // 10)`` pixels), as the
    official code does.

Keypoints (heatmaps)
    A per-pixel MLP can only output per-pixel quantities, and training on sampled pixels
    cannot compute a spatial softmax or a regression over the whole image, so each keypoint
    is a heatmap: the target at pixel centre ``(j + 0.5, i + 0.5)`` is
    ``exp(-d^2 / (2 sigma^2))`` for a visible keypoint and 0 for an invisible one (so an
    invisible keypoint learns a low confidence), trained with binary cross-entropy on the
    logits. Decoding takes the argmax pixel of the ensemble-mean heatmap and refines it to
    sub-pixel precision by fitting a parabola to the log-heatmap at the argmax and its two
    neighbours along x and along y (the separable Taylor step of DARK, Zhang et al., CVPR
    2020; at the border, the three samples nearest to it). For a Gaussian peak this is exact,
    where a local soft-argmax is biased towards the centre of its window when sigma is
    comparable to the window. Confidence = peak value of the mean heatmap, in [0, 1]. Extra
    training pixels are drawn near visible keypoints (`handsoff.label.train`), since the peaks
    cover few pixels. Member spread = RMS distance (pixels) of the members' argmax pixels from
    their mean (whole pixels: the members' full heatmaps are not kept); image score = mean over
    keypoints.

Depth
    The network predicts normalised log-depth ``z = (log d - mu) / sigma`` (mu, sigma from the
    training labels), trained with L1 on ``z`` plus 0.5 x the scale-invariant term of Eigen et
    al. (NeurIPS 2014): the per-image variance of the log-depth residual, which rewards getting
    the relative depth within an image right even where the absolute scale is off. Both are
    relative-error losses, so near and far surfaces count alike. The prediction is the mean of
    the members' depths ``exp(z_k sigma + mu)``; member spread = per-pixel standard deviation of
    those depths, image score = its mean over the foreground (predicted class != 0) when the
    labeler segments, else over all pixels.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from handsoff.label.prediction import LabelPrediction

if TYPE_CHECKING:  # model.py imports this module
    from handsoff.label.model import LabelerConfig

__all__ = ["IGNORE_INDEX", "TOP_FRACTION", "DEPTH_SI_WEIGHT", "default_keypoint_sigma", "js_divergence",
           "top_fraction_mean", "heatmap_targets", "keypoint_loss", "decode_heatmaps", "depth_loss",
           "PredictionBuilder"]

IGNORE_INDEX = 255
TOP_FRACTION = 0.1  # the image score averages the most uncertain 10% of pixels
DEPTH_SI_WEIGHT = 0.5
_EPS = 1e-12
_MAX_LOG_DEPTH = 80.0  # exp(88) overflows float32


def default_keypoint_sigma(label_resolution: int) -> float:
    """Heatmap sigma in pixels: 1.6 at 64x64, scaled with the label resolution (at least 1.5)."""
    return max(1.5, 0.025 * label_resolution)


# --------------------------------------------------------------------------- segmentation
def js_divergence(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Ensemble-mean probabilities and per-pixel Jensen-Shannon divergence across members.

    Args:
        log_probs: ``[K, ..., C]`` log-softmax of each member.

    Returns:
        ``(mean_probs [..., C], js [...])``; ``js >= 0`` (clamped: rounding can dip below 0
        when members agree).
    """
    probs = log_probs.exp()
    mean = probs.mean(0)
    member_entropy = -(probs * log_probs).sum(-1).mean(0)
    mean_entropy = -torch.special.xlogy(mean, mean).sum(-1)
    return mean, (mean_entropy - member_entropy).clamp_min(0.0)


def top_fraction_mean(values: Tensor, fraction: float = TOP_FRACTION) -> Tensor:
    """Per image, the mean of the largest ``max(1, floor(fraction * M))`` of its M values.

    Args:
        values: ``[N, ...]``; everything after the first axis is one image's values.
    """
    flat = values.reshape(values.shape[0], -1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(1)


# --------------------------------------------------------------------------- keypoints
def heatmap_targets(keypoints: Tensor, y: Tensor, x: Tensor, sigma: float) -> Tensor:
    """Gaussian heatmap values at label pixels.

    Args:
        keypoints: ``[P, K, 3]`` (x, y, visible) of the image each pixel belongs to, in label pixels.
        y, x: ``[P]`` integer pixel rows / columns (the pixel centre is at ``+0.5``).
        sigma: Gaussian standard deviation in pixels.

    Returns:
        float32 ``[P, K]`` in [0, 1]; 0 for invisible keypoints.
    """
    dx = x[:, None].float() + 0.5 - keypoints[..., 0]
    dy = y[:, None].float() + 0.5 - keypoints[..., 1]
    return torch.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)) * (keypoints[..., 2] > 0.5)


def keypoint_loss(logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Binary cross-entropy of heatmap logits against `heatmap_targets`, per member.

    Args:
        logits: ``[M, P, K]`` (members, pixels, keypoints).
        targets: ``[M, P, K]`` heatmap values in [0, 1].
        weight: ``[M, P, K]`` in {0, 1}, or None (all 1): 0 leaves a keypoint of a pixel's image
            out, for keypoints whose visibility is unknown (neither present nor absent).

    Returns:
        ``[M]``: the mean over the weighted entries (0 for a member without any).
    """
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if weight is None:
        return bce.mean((1, 2))
    return (bce * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1)


def _parabola_vertex(left: Tensor, centre: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Vertex of the parabola through (-1, left), (0, centre), (1, right), and whether it is a maximum."""
    curvature = left - 2 * centre + right
    peaked = curvature < 0
    return 0.5 * (left - right) / torch.where(peaked, curvature, -torch.ones_like(curvature)), peaked


def decode_heatmaps(heatmaps: Tensor, peak_scale: float = 1.0) -> Tensor:
    """Sub-pixel keypoints from heatmaps in [0, 1].

    Args:
        heatmaps: ``[N, K, H, W]``.
        peak_scale: the heatmap peak that means full confidence (`LabelerConfig.keypoint_peak`).

    Returns:
        float32 ``[N, K, 3]``: x, y in pixels (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``)
        and the confidence (peak value / ``peak_scale``, clipped to [0, 1]). The parabola is fitted to the three
        samples centred on the argmax (shifted inwards at the border) and its vertex is kept
        inside the argmax pixel. See the module docstring.
    """
    n, k, h, w = heatmaps.shape
    peak, index = heatmaps.reshape(n, k, h * w).max(-1)
    logs = heatmaps.clamp_min(_EPS).log().reshape(n, k, h * w)

    def refine(at: Tensor, size: int, stride: int, other: Tensor) -> Tensor:
        """Sub-pixel centre coordinate along one axis (``at``: argmax index along it)."""
        if size < 3:
            return at + 0.5
        centre = at.clamp(1, size - 2)
        samples = [logs.gather(-1, (other + (centre + d) * stride)[..., None])[..., 0] for d in (-1, 0, 1)]
        vertex, peaked = _parabola_vertex(*samples)
        position = torch.where(peaked, centre + vertex, at.to(vertex.dtype))
        return position.clamp(at - 0.5, at + 0.5) + 0.5

    i, j = index // w, index % w
    x = refine(j, w, 1, i * w)
    y = refine(i, h, w, j)
    return torch.stack([x, y, (peak / peak_scale).clamp(0.0, 1.0)], -1).float()


# --------------------------------------------------------------------------- depth
def depth_loss(z: Tensor, target_z: Tensor, image: Tensor, num_images: int, log_std: float) -> Tensor:
    """L1 on normalised log-depth plus `DEPTH_SI_WEIGHT` x the scale-invariant term, per member.

    Args:
        z: ``[K, P]`` predicted normalised log-depth.
        target_z: ``[K, P]`` target (NaN where the depth label is invalid).
        image: ``[K, P]`` image index of each pixel (groups pixels for the scale-invariant term).
        num_images: number of images (size of the per-image sums).
        log_std: the normalisation's sigma, to express the scale-invariant term in log-depth units.

    Returns:
        ``[K]`` losses (0 for a member without valid pixels).
    """
    valid = torch.isfinite(target_z)
    residual = torch.where(valid, z - target_z.nan_to_num(), torch.zeros_like(z))
    count = valid.sum(1).clamp_min(1)
    l1 = residual.abs().sum(1) / count
    # Per member and image: variance of the log residual (Eigen et al.'s scale-invariant error).
    k = z.shape[0]
    slots = (torch.arange(k, device=z.device)[:, None] * num_images + image).reshape(-1)
    zeros = torch.zeros(k * num_images, device=z.device)
    n_img = zeros.index_add(0, slots, valid.reshape(-1).float())
    r = residual.reshape(-1) * log_std
    mean = zeros.index_add(0, slots, r) / n_img.clamp_min(1)
    mean_sq = zeros.index_add(0, slots, r * r) / n_img.clamp_min(1)
    variance = ((mean_sq - mean * mean).clamp_min(0) * (n_img > 1)).view(k, num_images)
    used = (n_img > 1).view(k, num_images).sum(1).clamp_min(1)
    return l1 + DEPTH_SI_WEIGHT * variance.sum(1) / used


# --------------------------------------------------------------------------- inference
class PredictionBuilder:
    """Turns the ensemble's raw outputs, band by band, into a `LabelPrediction`.

    Keeps only what the result needs (label maps, the per-pixel JS map, the mean heatmaps and
    each member's running heatmap maximum), never the members' full outputs, so inference
    memory stays at the size of one band.
    """

    def __init__(self, config: "LabelerConfig", num_images: int, device: torch.device) -> None:
        """
        Args:
            config: the labeler's `LabelerConfig`.
            num_images: N.
            device: where the maps are kept until `finish`.
        """
        self.config = config
        n, r, k = num_images, config.label_resolution, config.ensemble
        self.slices = config.task_slices
        self.seg = self.js = self.heat = self.depth = None
        if "seg" in self.slices:
            self.seg = torch.zeros(n, r, r, dtype=torch.uint8, device=device)
            self.js = torch.zeros(n, r, r, device=device)
        if "keypoints" in self.slices:
            kp = len(config.keypoint_names)
            self.heat = torch.zeros(n, kp, r, r, device=device)
            self.best_value = torch.full((k, n, kp), -math.inf, device=device)
            self.best_index = torch.zeros(k, n, kp, dtype=torch.long, device=device)
        if config.depth:
            self.depth = torch.zeros(n, r, r, device=device)
            # Spread sums over [foreground, all] pixels; all pixels count where no foreground was found.
            self.spread_sum = torch.zeros(2, n, dtype=torch.float64, device=device)
            self.spread_count = torch.zeros(2, n, dtype=torch.float64, device=device)

    def add(self, images: slice, rows: slice, out: Tensor) -> None:
        """Take the raw outputs ``out`` ``[K, n, T, W, O]`` of images ``images``, label rows ``rows``."""
        fg: Optional[Tensor] = None
        if self.seg is not None:
            log_probs = F.log_softmax(out[..., self.slices["seg"]], -1)
            mean, js = js_divergence(log_probs)
            labels = mean.argmax(-1)
            self.seg[images, rows] = labels.to(torch.uint8)
            self.js[images, rows] = js
            fg = labels != 0
        if self.heat is not None:
            self._add_heatmaps(images, rows, torch.sigmoid(out[..., self.slices["keypoints"]]))
        if self.depth is not None:
            cfg = self.config
            log_depth = out[..., self.slices["depth"].start] * cfg.depth_log_std + cfg.depth_log_mean
            depths = torch.exp(log_depth.clamp(-_MAX_LOG_DEPTH, _MAX_LOG_DEPTH))  # finite even for a wild member
            self.depth[images, rows] = depths.mean(0)
            spread = depths.std(0, unbiased=False)
            everywhere = torch.ones_like(spread)
            masks = torch.stack([everywhere if fg is None else fg.to(spread.dtype), everywhere])
            self.spread_sum[:, images] += (spread * masks).sum((2, 3)).double()
            self.spread_count[:, images] += masks.sum((2, 3)).double()

    def _add_heatmaps(self, images: slice, rows: slice, heat: Tensor) -> None:
        k, n, t, w, kp = heat.shape
        self.heat[images, :, rows] = heat.mean(0).permute(0, 3, 1, 2)
        value, index = heat.permute(0, 1, 4, 2, 3).reshape(k, n, kp, t * w).max(-1)
        index = index + rows.start * w  # flat pixel index in the whole label map
        best_value, best_index = self.best_value[:, images], self.best_index[:, images]
        better = value > best_value
        best_value[better], best_index[better] = value[better], index[better]  # views: updates in place

    def finish(self) -> LabelPrediction:
        """The `LabelPrediction` (numpy, on the CPU) of everything added."""
        scores: dict[str, np.ndarray] = {}
        pred = LabelPrediction(uncertainty=np.zeros(0, np.float32))
        if self.seg is not None:
            pred.seg = self.seg.cpu().numpy()
            pred.seg_uncertainty = self.js.cpu().numpy()
            scores["seg_js"] = top_fraction_mean(self.js).cpu().numpy().astype(np.float32)
        if self.heat is not None:
            pred.keypoints = decode_heatmaps(self.heat, self.config.keypoint_peak).cpu().numpy()
            scores["keypoints_spread"] = self._keypoint_spread().cpu().numpy().astype(np.float32)
        if self.depth is not None:
            pred.depth = self.depth.cpu().numpy()
            mean = self.spread_sum / self.spread_count.clamp_min(1)
            spread = torch.where(self.spread_count[0] > 0, mean[0], mean[1])
            scores["depth_spread"] = spread.cpu().numpy().astype(np.float32)
        pred.scores = scores
        pred.uncertainty = (scores["seg_js"] if "seg_js" in scores
                            else np.mean(list(scores.values()), 0, dtype=np.float32))
        return pred

    def _keypoint_spread(self) -> Tensor:
        w = self.config.label_resolution
        xy = torch.stack([self.best_index % w, self.best_index // w], -1).float()  # [K, N, Kp, 2]
        dist2 = (xy - xy.mean(0)).square().sum(-1)
        return dist2.mean(0).sqrt().mean(-1)
