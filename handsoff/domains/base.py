"""The contract every built-in domain fulfils: a labeled batch and the `Domain` protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["LabeledBatch", "Domain"]


@dataclass(frozen=True)
class LabeledBatch:
    """N rendered (or loaded) images with exact, pixel-aligned labels.

    Attributes:
        images: uint8 ``[N, H, W, 3]`` RGB.
        seg: uint8 ``[N, H, W]`` class index into the domain's ``classes`` (255 = ignore).
        depth: float32 ``[N, H, W]`` camera-space depth (larger = farther) of the surface
            that the ``seg`` label belongs to; the domain documents its background value.
        keypoints: float32 ``[N, K, 3]``: ``x, y`` in pixels (the pixel in column ``j``,
            row ``i`` covers ``[j, j+1) x [i, i+1)``, so its centre is ``(j+0.5, i+0.5)``)
            and ``visible`` in {0, 1}.
        names: N unique file-name-safe names (the folder format writes ``images/NAME.png``).
    """

    images: np.ndarray
    seg: np.ndarray
    depth: np.ndarray
    keypoints: np.ndarray
    names: list[str]

    def __post_init__(self) -> None:
        n, h, w = self.seg.shape if self.seg.ndim == 3 else (-1, -1, -1)
        expected = {
            "images": ((n, h, w, 3), np.uint8),
            "seg": ((n, h, w), np.uint8),
            "depth": ((n, h, w), np.float32),
        }
        for field, (shape, dtype) in expected.items():
            value = getattr(self, field)
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(f"LabeledBatch.{field}: expected {np.dtype(dtype).name} {shape}, "
                                 f"got {value.dtype} {value.shape}")
        kp = self.keypoints
        if kp.ndim != 3 or kp.shape[0] != n or kp.shape[2] != 3 or kp.dtype != np.float32:
            raise ValueError(f"LabeledBatch.keypoints: expected float32 [{n}, K, 3], got {kp.dtype} {kp.shape}")
        if len(self.names) != n:
            raise ValueError(f"LabeledBatch.names: expected {n} names, got {len(self.names)}")

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def concat(batches: Sequence["LabeledBatch"]) -> "LabeledBatch":
        """Join batches of the same image size and keypoint count along N."""
        if not batches:
            raise ValueError("LabeledBatch.concat needs at least one batch")
        return LabeledBatch(
            images=np.concatenate([b.images for b in batches]),
            seg=np.concatenate([b.seg for b in batches]),
            depth=np.concatenate([b.depth for b in batches]),
            keypoints=np.concatenate([b.keypoints for b in batches]),
            names=[name for b in batches for name in b.names],
        )

    def select(self, index: slice | Sequence[int]) -> "LabeledBatch":
        """A sub-batch (a slice or a list of positions)."""
        names = self.names[index] if isinstance(index, slice) else [self.names[i] for i in index]
        return LabeledBatch(self.images[index], self.seg[index], self.depth[index],
                            self.keypoints[index], list(names))


@runtime_checkable
class Domain(Protocol):
    """A procedurally rendered image domain with exact labels.

    ``render(n, seed, size, start)`` returns images ``start .. start+n-1`` of the endless,
    seed-determined sequence: image ``i`` depends only on ``(seed, i, size)``, never on how
    the sequence is cut into calls.
    """

    name: str
    classes: tuple[str, ...]
    keypoint_names: tuple[str, ...]

    def render(self, n: int, seed: int, size: int, start: int = 0) -> LabeledBatch:
        """Render images ``start .. start+n-1`` of the sequence ``seed`` at ``size x size``."""
        ...
