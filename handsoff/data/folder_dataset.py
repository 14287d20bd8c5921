"""A labeled-set folder as a torch Dataset, with the standard augmentation for few real images.

``LabeledFolderDataset(folder)[i]`` is a dict with the same keys, dtypes and meanings as
`handsoff.data.shards.ShardDataset` items, so both mix in one ``torch.utils.data.ConcatDataset``::

    image        uint8   [3, H, W]
    seg          int64   [H, W]      class index, 255 = ignore         (when the folder has seg/)
    depth        float32 [H, W]      NaN = no depth here (padding)      (when it has depth/)
    keypoints    float32 [K, 3]      x, y, visible (0 or 1)             (when it has keypoints.json)
    uncertainty  float32 []          always 0 (real labels are certain)
    seed         int64   []          always -1 (a real image has no latent seed)

The keypoint convention shared with shards: column 3 is ``visible`` in {0, 1} here and the
labeler's ``confidence`` in [0, 1] in a shard; for training, a keypoint counts as visible when
that value is >= `VISIBLE_THRESHOLD` (0.5). Keypoint ``x, y`` are pixels, the pixel in column
``j`` covering ``[j, j+1)``.

Augmentation (``augment=True``), drawn per item, labels transformed with the image:

* horizontal flip (p = 0.5): image, seg and depth are mirrored, keypoint x becomes ``W - x``,
  and left/right keypoints and classes swap names (`mirror_permutation`: 'left_eye' <->
  'right_eye', 'mouth_left' <-> 'mouth_right', 'l_brow' <-> 'r_brow');
* random scale and crop: zoom by s, log-uniform in [1/1.25, 1.25], at a random offset that
  keeps the frame inside the zoomed image (s >= 1) or the zoomed image inside the frame
  (s < 1). One affine warp: bilinear for the image, nearest for seg and depth (a depth
  value stays on its own surface). Uncovered pixels are black (before the colour jitter),
  seg 255 (ignored) and depth NaN. Depth values are not rescaled (the built-in domain's
  camera is orthographic).
  A keypoint that leaves the frame becomes invisible;
* colour jitter: brightness, contrast and saturation factors uniform in [0.8, 1.2].

Randomness comes from the dataset's own generator, seeded by ``seed`` (or `reseed`), so a
run is reproducible; in a ``DataLoader`` worker it is re-derived from the worker's seed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from handsoff.data.labeled_set import IGNORE_INDEX, LabeledSet, read_labeled_set
from handsoff.errors import HandsoffError

__all__ = ["VISIBLE_THRESHOLD", "LabeledFolderDataset", "Augmentation", "draw_augmentation", "mirror_permutation",
           "keypoints_visible"]

PathLike = Union[str, "os.PathLike[str]"]

#: A keypoint whose third column (visible, or a shard's confidence) is at least this counts as visible.
VISIBLE_THRESHOLD = 0.5

_SCALE_RANGE = (1 / 1.25, 1.25)
_JITTER = 0.2
_SIDE_SWAP = {"left": "right", "right": "left", "l": "r", "r": "l"}
_TOKEN = re.compile(r"([A-Za-z0-9]+)")


def keypoints_visible(keypoints: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Boolean visibility ``[..., K]`` of keypoints ``[..., K, 3]`` under the shared convention."""
    return keypoints[..., 2] >= VISIBLE_THRESHOLD


def _mirrored_name(name: str) -> str:
    """``name`` with each whole token 'left'/'right'/'l'/'r' (any case) replaced by its opposite."""
    def swap(match: re.Match) -> str:
        token = match.group(1)
        other = _SIDE_SWAP.get(token.lower())
        if other is None:
            return token
        return other.upper() if token.isupper() and len(token) > 1 else (
            other.capitalize() if token[0].isupper() else other)
    return _TOKEN.sub(swap, name)


def mirror_permutation(names: Sequence[str]) -> list[int]:
    """Where each name goes under a horizontal flip: ``perm[i]`` = index of i's mirror name.

    Names pair up when they differ only in a whole left/right token ('left_eye' and
    'right_eye', 'mouth_left' and 'mouth_right', 'l_ear' and 'r_ear'); a name without a
    partner in ``names`` maps to itself. The permutation is its own inverse.

    >>> mirror_permutation(["right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left"])
    [1, 0, 2, 4, 3]
    """
    index = {name: i for i, name in enumerate(names)}
    return [index.get(_mirrored_name(name), i) for i, name in enumerate(names)]


class LabeledFolderDataset(Dataset):
    """A labeled-set folder (or an already read `LabeledSet`) as a map-style Dataset.

    Args:
        source: the folder, or a `LabeledSet`.
        augment: apply the standard augmentation (module docstring) to every item.
        seed: seed of the augmentation's random generator.

    Attributes:
        root: the folder.
        labeled_set: the `LabeledSet` read from it.
        classes: segmentation class names (empty tuple without seg/).
        keypoint_names: keypoint names (empty tuple without keypoints.json).
        resolution: image side in pixels when images are square, else ``(H, W)``.
        image_size: ``(H, W)``.

    Raises:
        HandsoffError: the folder cannot be read, or its images differ in size (a batch
            needs one size); the message names the folder.
    """

    def __init__(self, source: PathLike | LabeledSet, augment: bool = False, seed: int = 0) -> None:
        self.labeled_set = source if isinstance(source, LabeledSet) else read_labeled_set(source)
        ls = self.labeled_set
        self.root = Path(ls.root)
        sizes = sorted({img.shape[:2] for img in ls.images})
        if len(sizes) > 1:
            raise HandsoffError(f"{self.root}: images differ in size ({sizes[0][1]}x{sizes[0][0]} and "
                                f"{sizes[1][1]}x{sizes[1][0]}); a dataset needs one image size")
        self.image_size: tuple[int, int] = sizes[0]
        h, w = self.image_size
        self.resolution: Union[int, tuple[int, int]] = h if h == w else (h, w)
        self.classes = ls.classes if ls.seg is not None else ()
        self.keypoint_names = ls.keypoint_names if ls.keypoints is not None else ()
        self.augment = augment
        self._kp_perm = np.asarray(mirror_permutation(self.keypoint_names), np.int64)
        # Class lookup table for flips; 255 (ignore) and unknown ids map to themselves.
        self._class_perm = np.arange(256, dtype=np.uint8)
        self._class_perm[:len(self.classes)] = mirror_permutation(self.classes)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's random stream from ``seed`` (a training run calls this,
        so its augmentations depend on its own seed only)."""
        self._seed = int(seed)
        self._rng = np.random.default_rng(self._seed)
        self._worker: Optional[int] = None

    def __len__(self) -> int:
        return len(self.labeled_set)

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker != info.id:
            # A DataLoader worker holds a copy of the parent's generator: derive its own stream.
            self._rng = np.random.default_rng([self._seed, info.seed % 2 ** 32])
            self._worker = info.id
        return self._rng

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sample(i, draw_augmentation(self.image_size, self._generator()) if self.augment else None)

    def sample(self, i: int, augmentation: Optional["Augmentation"] = None) -> dict[str, torch.Tensor]:
        """Item ``i`` transformed by ``augmentation`` (None: as stored)."""
        ls = self.labeled_set
        image = ls.images[i]
        seg = ls.seg[i] if ls.seg is not None else None
        depth = ls.depth[i] if ls.depth is not None else None
        keypoints = ls.keypoints[i].copy() if ls.keypoints is not None else None
        if augmentation is not None:
            image, seg, depth, keypoints = self._apply(augmentation, image, seg, depth, keypoints)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}
        if seg is not None:
            item["seg"] = torch.from_numpy(seg.astype(np.int64))
        if depth is not None:
            item["depth"] = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))
        if keypoints is not None:
            item["keypoints"] = torch.from_numpy(keypoints.astype(np.float32))
        item["uncertainty"] = torch.tensor(0.0, dtype=torch.float32)
        item["seed"] = torch.tensor(-1, dtype=torch.int64)
        return item

    # ------------------------------------------------------------------------- augmentation
    def _apply(self, aug: "Augmentation", image: np.ndarray, seg: Optional[np.ndarray], depth: Optional[np.ndarray],
               keypoints: Optional[np.ndarray]
               ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        affine = aug.affine(self.image_size[1])
        # cv2 addresses pixel centres (j, not j + 0.5): shift in and out by half a pixel.
        cv_affine = affine.copy()
        cv_affine[:, 2] += affine[:, :2].sum(1) * 0.5 - 0.5

        image = _colour_jitter(self._warp(image, cv_affine, cv2.INTER_LINEAR, 0), aug.colour)
        if seg is not None:
            seg = self._warp(seg, cv_affine, cv2.INTER_NEAREST, IGNORE_INDEX)
            if aug.flip:
                seg = self._class_perm[seg]
        if depth is not None:
            depth = self._warp(depth.astype(np.float32), cv_affine, cv2.INTER_NEAREST, float("nan"))
        if keypoints is not None:
            keypoints = self._move_keypoints(keypoints, affine, aug.flip)
        return image, seg, depth, keypoints

    def _warp(self, array: np.ndarray, affine: np.ndarray, interpolation: int, border: float) -> np.ndarray:
        h, w = self.image_size
        value = (border,) * (array.shape[2] if array.ndim == 3 else 1)
        return cv2.warpAffine(array, affine, (w, h), flags=interpolation, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=value)

    def _move_keypoints(self, keypoints: np.ndarray, affine: np.ndarray, flip: bool) -> np.ndarray:
        h, w = self.image_size
        out = keypoints.copy()
        out[:, 0] = affine[0, 0] * keypoints[:, 0] + affine[0, 2]
        out[:, 1] = affine[1, 1] * keypoints[:, 1] + affine[1, 2]
        if flip:
            out = out[self._kp_perm]
        inside = (out[:, 0] >= 0) & (out[:, 0] <= w) & (out[:, 1] >= 0) & (out[:, 1] <= h)
        out[:, 2] = np.where(inside, out[:, 2], 0.0)
        return out


@dataclass(frozen=True)
class Augmentation:
    """One draw of the standard augmentation.

    Attributes:
        flip: mirror horizontally (before scaling).
        scale: zoom factor (> 1 zooms in).
        offset: ``(tx, ty)`` pixels: a point at continuous ``(x, y)`` of the (flipped) image
            lands at ``(scale * x + tx, scale * y + ty)``.
        colour: brightness, contrast and saturation factors (1, 1, 1 = unchanged).
    """

    flip: bool = False
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def affine(self, width: int) -> np.ndarray:
        """``[2, 3]`` map of continuous pixel coordinates (flip ``x -> W - x`` folded in)."""
        a = -self.scale if self.flip else self.scale
        bx = self.offset[0] + (self.scale * width if self.flip else 0.0)
        return np.array([[a, 0.0, bx], [0.0, self.scale, self.offset[1]]])


def draw_augmentation(size: tuple[int, int], rng: np.random.Generator) -> Augmentation:
    """A random `Augmentation` for images of ``size`` (H, W), as the module docstring describes."""
    h, w = size
    flip = bool(rng.random() < 0.5)
    scale = float(np.exp(rng.uniform(*np.log(_SCALE_RANGE))))
    # Offsets keep the frame inside the zoomed image (s >= 1) or the image inside the frame.
    tx = float(rng.uniform(*sorted((0.0, w - scale * w))))
    ty = float(rng.uniform(*sorted((0.0, h - scale * h))))
    colour = tuple(float(f) for f in rng.uniform(1 - _JITTER, 1 + _JITTER, size=3))
    return Augmentation(flip, scale, (tx, ty), colour)


def _colour_jitter(image: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Scale brightness, contrast and saturation by ``factors``."""
    if factors == (1.0, 1.0, 1.0):
        return image
    b, c, s = factors
    x = image.astype(np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * s + gray[..., None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
