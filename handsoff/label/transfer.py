"""Label transfer by dense correspondence: move each labeled image's labels onto its reconstruction.

The labeler learns "features of the inversion G(w_i) -> labels of real image i". Where the
inversion draws a part elsewhere (an eye two pixels higher, a mouth wider), the labels disagree
with the features they are paired with. Instead of moving the image to the labels (a better
inversion), this moves the labels to the image: dense optical flow from each real image to its
reconstruction and back (OpenCV DIS by default, Farneback on request; both images lightly
blurred first, `FLOW_BLUR`), then

* segmentation is warped with nearest neighbour (class indices must not blend);
* depth is warped bilinearly, leaving out invalid source pixels (the labeler's convention:
  non-finite or <= 0 is invalid, `handsoff.label.targets.valid_depth`);
* each keypoint moves by the forward flow at its position;
* a forward-backward consistency check (the form of Sundaram, Brox, Keutzer, ECCV 2010:
  ``|F(p) + B(p + F(p))|^2 <= FB_ALPHA (|F|^2 + |B|^2) + FB_BETA``) marks the pixels whose
  correspondence cannot be trusted (occluded, out of frame, or a flow that does not invert):
  their seg becomes 255 (ignore) and their depth 0 (invalid: the labeled-set reader refuses
  NaN, and the labeler, `handsoff.metrics.depth_scores` and the resizing all skip depth <= 0).
  A visible keypoint whose own pixel fails the check, or that lands outside the frame, becomes
  invisible; `LabelTransfer.keypoint_known` tells which of those are unknown (unreliable flow:
  the labeler skips them) and which truly left the frame (trained as absent).

Flows are computed at the images' resolution (the generator's) and resized, with their vectors
scaled, to each label map's resolution, so labels may be finer than the images. OpenCV runs on
one thread inside this module so that results do not depend on the machine
(`cv2.setNumThreads`, restored afterwards).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import cv2
import numpy as np

from handsoff.data.images import resize_image
from handsoff.data.labeled_set import IGNORE_INDEX, LabeledSet
from handsoff.errors import HandsoffError
from handsoff.label.defaults import DEFAULT_FLOW_METHOD, FLOW_METHODS, TRANSFER_MODES
from handsoff.label.targets import check_latents, image_path, valid_depth

if TYPE_CHECKING:
    import torch

__all__ = ["FLOW_METHODS", "DEFAULT_FLOW_METHOD", "TRANSFER_MODES", "FB_ALPHA", "FB_BETA", "FLOW_BLUR",
           "TransferStats", "LabelTransfer", "dense_flow", "consistent_flow", "resize_flow", "transfer_labels",
           "labels_on_reconstructions", "summarize"]

#: Forward-backward check: relative (to the squared flow lengths) and absolute (pixels^2) tolerance, in
#: pixels of the images the flow is computed on. Sundaram et al. use 0.01 and 0.5 on video frames; between
#: the study's 64x64 images and their inversions (50 refinement steps) those kept about 40% of the pixels
#: and a third of the keypoints, and a labeler fit on the transfer scored keypoint PCK@0.05 0.12 on
#: held-out inversions against 0.17 with 0.05 and 2 (about 1.4 pixels); seg and depth were equal within
#: the noise (one labeler seed; two seeds differ by about 0.06 in PCK).
FB_ALPHA = 0.05
FB_BETA = 2.0
#: Gaussian blur (pixels) of both images before the flow: the real image's pixel noise and fine texture have
#: no counterpart in a reconstruction, and matching them only adds wrong matches.
FLOW_BLUR = 1.0


@dataclass(frozen=True)
class TransferStats:
    """What the transfer did to one image.

    Attributes:
        kept: share of the reconstruction's label pixels whose correspondence passed the
            forward-backward check (the rest became ignore / invalid depth).
        mean_flow: mean length of the flow reconstruction -> real image, in pixels of the images.
        keypoints_kept: share of the visible keypoints that stay visible (None: no visible ones
            or no keypoints).
    """

    kept: float
    mean_flow: float
    keypoints_kept: Optional[float]


@dataclass(frozen=True)
class LabelTransfer:
    """A labeled set moved onto the reconstructions.

    Attributes:
        labels: the labeled set with the reconstructions (resized to each label map's size) as
            its images and the transferred labels; same names, classes, keypoint names, meta.
        keypoint_known: bool ``[N, K]``: False for a keypoint that was visible but whose flow
            failed the consistency check (now invisible, and unknown: do not train it as absent);
            None when the set has no keypoints.
        stats: one `TransferStats` per image.
    """

    labels: LabeledSet
    keypoint_known: Optional[np.ndarray]
    stats: list[TransferStats]


@contextlib.contextmanager
def _single_thread_cv2() -> Iterator[None]:
    """OpenCV on one thread for the block: DIS and Farneback results then do not depend on the core count."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _gray(image: np.ndarray, blur: float) -> np.ndarray:
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return cv2.GaussianBlur(gray, (0, 0), blur) if blur > 0 else gray


def dense_flow(source: np.ndarray, target: np.ndarray, method: str = DEFAULT_FLOW_METHOD,
               blur: float = FLOW_BLUR) -> np.ndarray:
    """Dense optical flow from ``source`` to ``target`` (run on one OpenCV thread: deterministic).

    Args:
        source, target: uint8 ``[H, W, 3]`` RGB images of one size (compared in grayscale).
        method: ``'dis'`` or ``'farneback'`` (`FLOW_METHODS`).
        blur: sigma (pixels) of a Gaussian blur of both images first; 0 = none.

    Returns:
        float32 ``[H, W, 2]`` (dx, dy) in pixels: ``source[y, x]`` corresponds to
        ``target[y + dy, x + dx]`` (OpenCV's convention).
    """
    if method not in FLOW_METHODS:
        raise HandsoffError(f"unknown flow method {method!r}; methods are {', '.join(FLOW_METHODS)}")
    a, b = _gray(source, blur), _gray(target, blur)
    with _single_thread_cv2():
        if method == "dis":
            dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
            # Full resolution, small dense patches: a 64x64 image has few pixels per part, and the
            # presets' coarser finest scale (1-2) smears small parts (benchmarks/transfer.py).
            dis.setFinestScale(0)
            dis.setPatchSize(8)
            dis.setPatchStride(2)
            dis.setVariationalRefinementIterations(5)
            flow = dis.calc(a, b, None)
        else:
            flow = cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=3, winsize=9, iterations=3,
                                                poly_n=5, poly_sigma=1.1, flags=0)
    return np.ascontiguousarray(flow, dtype=np.float32)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs, ys


def _sample(array: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, interpolation: int, border_value: float = 0.0
            ) -> np.ndarray:
    """``array`` read at (map_x, map_y) (index coordinates, pixel centres at integers), constant outside."""
    return cv2.remap(array, map_x, map_y, interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)


def consistent_flow(forward: np.ndarray, backward: np.ndarray, alpha: float = FB_ALPHA, beta: float = FB_BETA
                    ) -> np.ndarray:
    """Where ``forward`` (a -> b) can be trusted, by the forward-backward check, in a's frame.

    A pixel p passes when ``p + F(p)`` lies inside the frame and
    ``|F(p) + B(p + F(p))|^2 <= alpha (|F(p)|^2 + |B(p + F(p))|^2) + beta``: following the
    flow there and back returns near p.

    Args:
        forward: float32 ``[H, W, 2]`` flow a -> b (`dense_flow`).
        backward: float32 ``[H, W, 2]`` flow b -> a.
        alpha, beta: relative and absolute tolerance (pixels^2).

    Returns:
        bool ``[H, W]``.
    """
    h, w = forward.shape[:2]
    xs, ys = _grid(h, w)
    to_x, to_y = xs + forward[..., 0], ys + forward[..., 1]
    back = _sample(backward, to_x, to_y, cv2.INTER_LINEAR)
    inside = (to_x >= -0.5) & (to_x <= w - 0.5) & (to_y >= -0.5) & (to_y <= h - 0.5)
    error = np.square(forward + back).sum(-1)
    bound = alpha * (np.square(forward).sum(-1) + np.square(back).sum(-1)) + beta
    return inside & (error <= bound)


def resize_flow(flow: np.ndarray, height: int, width: int) -> np.ndarray:
    """A flow field ``[h, w, 2]`` at another resolution ``[height, width, 2]``, its vectors scaled to match."""
    h, w = flow.shape[:2]
    if (h, w) == (height, width):
        return flow
    resized = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized * np.asarray([width / w, height / h], np.float32)


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def _warp_seg(seg: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    warped = _sample(seg, map_x, map_y, cv2.INTER_NEAREST, IGNORE_INDEX)
    return np.where(keep, warped, IGNORE_INDEX).astype(np.uint8)


def _warp_depth(depth: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Bilinear warp that leaves invalid source pixels out: valid where all of a pixel's support was."""
    valid = valid_depth(depth).astype(np.float32)
    weight = _sample(valid, map_x, map_y, cv2.INTER_LINEAR)
    total = _sample(np.where(valid > 0, depth, 0.0).astype(np.float32), map_x, map_y, cv2.INTER_LINEAR)
    ok = keep & (weight > 1 - 1e-4)
    return np.where(ok, total / np.maximum(weight, 1e-12), 0.0).astype(np.float32)


def _move_keypoints(points: np.ndarray, forward: np.ndarray, reliable: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints ``[K, 3]`` moved by ``forward`` (label resolution); returns them and which are known.

    A keypoint at (x, y) (pixel centres at +0.5) moves by the bilinearly read flow there. A
    visible one turns invisible when its pixel is not ``reliable`` (then unknown) or when it
    lands outside the frame (then known: absent from the reconstruction).
    """
    h, w = forward.shape[:2]
    out = points.copy()
    x, y, visible = points[:, 0], points[:, 1], points[:, 2] > 0.5
    inside = (x >= 0) & (x <= w) & (y >= 0) & (y <= h)
    at_x = np.clip(x - 0.5, 0, w - 1).astype(np.float32)[:, None]
    at_y = np.clip(y - 0.5, 0, h - 1).astype(np.float32)[:, None]
    delta = cv2.remap(forward, at_x, at_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[:, 0]
    out[:, :2] = np.where(inside[:, None], points[:, :2] + delta, points[:, :2])
    pixel_ok = reliable[np.clip(np.floor(y), 0, h - 1).astype(int), np.clip(np.floor(x), 0, w - 1).astype(int)]
    lands = (out[:, 0] >= 0) & (out[:, 0] <= w) & (out[:, 1] >= 0) & (out[:, 1] <= h)
    # Leaving the frame is checked first: such a pixel also fails the consistency check (no way back).
    unknown = visible & lands & ~pixel_ok
    out[:, 2] = (visible & lands & pixel_ok).astype(np.float32)
    return out, ~unknown


def _check_inputs(images: np.ndarray, reconstructions: np.ndarray, labels: LabeledSet) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise HandsoffError(f"{labels.root}: images for the flow must be uint8 [N, H, W, 3], got "
                            f"{images.dtype} {list(images.shape)}")
    if reconstructions.shape != images.shape or reconstructions.dtype != np.uint8:
        raise HandsoffError(f"{labels.root}: reconstructions are {reconstructions.dtype} "
                            f"{list(reconstructions.shape)} but the images are uint8 {list(images.shape)}")
    if len(images) != len(labels):
        raise HandsoffError(f"{labels.root}: {len(labels)} labeled images but {len(images)} images for the flow")
    h, w = images.shape[1:3]
    for name, image in zip(labels.names, labels.images):
        lh, lw = image.shape[:2]
        if lh * w != lw * h:  # labels may be finer or coarser, never of another shape
            raise HandsoffError(f"{image_path(labels, name)}: labels are {lw}x{lh} but the images for the flow are "
                                f"{w}x{h} (another aspect ratio)")


def transfer_labels(images: np.ndarray, reconstructions: np.ndarray, labels: LabeledSet, *,
                    method: str = DEFAULT_FLOW_METHOD, alpha: float = FB_ALPHA, beta: float = FB_BETA
                    ) -> LabelTransfer:
    """Move ``labels`` (of the real ``images``) onto ``reconstructions`` (see the module docstring).

    Args:
        images: uint8 ``[N, H, W, 3]``: the real images, row i that of ``labels.names[i]``, at the
            resolution the reconstructions have (the labeled set's own images resized, e.g. with
            `handsoff.data.images.resize_image`, when they differ).
        reconstructions: uint8 ``[N, H, W, 3]``: their inversions'
            images (`handsoff.invert.invert.reconstruct`).
        labels: the labeled set of the real images; its labels may be at another resolution than
            ``H x W`` (the flow is resized to each), with the same aspect ratio.
        method: ``'dis'`` or ``'farneback'``.
        alpha, beta: the forward-backward check's tolerances (`consistent_flow`).

    Returns:
        A `LabelTransfer`: the moved set, which keypoints are known, per-image `TransferStats`.

    Raises:
        HandsoffError: one line naming the set or the image file when the counts, shapes or
            aspect ratios do not match.
    """
    _check_inputs(images, reconstructions, labels)
    seg, depth, stats = [], [], []
    keypoints = None if labels.keypoints is None else labels.keypoints.copy()
    known = None if keypoints is None else np.ones(keypoints.shape[:2], bool)
    recon_images = []
    for i, image in enumerate(labels.images):
        forward = dense_flow(images[i], reconstructions[i], method)   # real -> reconstruction
        backward = dense_flow(reconstructions[i], images[i], method)  # reconstruction -> real
        lh, lw = image.shape[:2]
        # Label pixel q of the reconstruction takes the real label at q + B(q), if the flow is consistent there.
        keep_recon = _resize_mask(consistent_flow(backward, forward, alpha, beta), lh, lw)
        back = resize_flow(backward, lh, lw)
        xs, ys = _grid(lh, lw)
        map_x, map_y = xs + back[..., 0], ys + back[..., 1]
        if labels.seg is not None:
            seg.append(_warp_seg(labels.seg[i], map_x, map_y, keep_recon))
        if labels.depth is not None:
            depth.append(_warp_depth(labels.depth[i], map_x, map_y, keep_recon))
        kept_points = None
        if keypoints is not None:
            keep_real = _resize_mask(consistent_flow(forward, backward, alpha, beta), lh, lw)
            visible = keypoints[i, :, 2] > 0.5
            keypoints[i], known[i] = _move_keypoints(keypoints[i], resize_flow(forward, lh, lw), keep_real)
            kept_points = float(keypoints[i, visible, 2].mean()) if visible.any() else None
        recon_images.append(resize_image(reconstructions[i], lh) if lh == lw else
                            cv2.resize(reconstructions[i], (lw, lh), interpolation=cv2.INTER_LINEAR))
        stats.append(TransferStats(kept=float(keep_recon.mean()),
                                   mean_flow=float(np.linalg.norm(backward, axis=-1).mean()),
                                   keypoints_kept=kept_points))
    moved = replace(labels, images=recon_images, seg=seg if labels.seg is not None else None,
                    depth=depth if labels.depth is not None else None, keypoints=keypoints)
    return LabelTransfer(moved, known, stats)


def labels_on_reconstructions(G: "torch.nn.Module", ws: "torch.Tensor", labels: LabeledSet, *,
                              method: str = DEFAULT_FLOW_METHOD) -> LabelTransfer:
    """`transfer_labels` of ``labels`` onto ``G``'s reconstructions of its images from ``ws``.

    Args:
        G: the generator the latents were inverted with (reconstructions: `handsoff.invert.invert.reconstruct`).
        ws: ``[N, num_ws, w_dim]``, row i the latents of ``labels.names[i]``.
        labels: the labeled set; its images are resized to the generator's resolution for the
            flow as ``handsoff invert --resize`` does (`handsoff.data.images.resize_image`).
        method: the flow method (`FLOW_METHODS`).
    """
    from handsoff.invert.invert import reconstruct

    check_latents(G, ws, labels)
    resolution = int(G.img_resolution)
    images = np.stack([resize_image(image, resolution) for image in labels.images])
    return transfer_labels(images, reconstruct(G, ws), labels, method=method)


def summarize(stats: Sequence[TransferStats]) -> dict[str, Optional[float]]:
    """Means over images of `TransferStats` (keypoints over the images that have visible ones)."""
    points = [s.keypoints_kept for s in stats if s.keypoints_kept is not None]
    return {"kept": float(np.mean([s.kept for s in stats])) if stats else None,
            "mean_flow": float(np.mean([s.mean_flow for s in stats])) if stats else None,
            "keypoints_kept": float(np.mean(points)) if points else None}
