"""Conversions between generator outputs and uint8 pictures, grids and PNG files."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from handsoff.utils.io import PathLike, atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Generator images ``[N, C, H, W]`` in about [-1, 1] -> uint8 ``[N, H, W, C]``."""
    pixels = (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: Sequence[np.ndarray] | np.ndarray, cols: Optional[int] = None,
               pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images ``[N, H, W, C]`` (all one size) into one ``[rows*H, cols*W, C]`` picture.

    ``cols`` defaults to the smallest square that holds them all.
    """
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"image_grid expects a non-empty [N, H, W, C] array, got shape {images.shape}")
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=images.dtype)
    for i, img in enumerate(images):
        y = pad + (i // cols) * (h + pad)
        x = pad + (i % cols) * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def save_png(path: PathLike, picture: np.ndarray) -> None:
    """Save a uint8 ``[H, W, 3]`` (or ``[H, W]``) picture as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(picture)).save(tmp, format="PNG")
