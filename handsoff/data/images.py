"""Reading user images strictly: 8-bit RGB or a one-line error naming the file.

handsoff's networks take 8-bit RGB. Rather than converting silently (dropping an alpha channel,
scaling 16-bit values, replicating a gray channel), a file of another kind is refused with a
message that says what it is, so the user can convert it knowingly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from handsoff.errors import HandsoffError

__all__ = ["read_rgb_image", "read_image_folder", "resize_image"]

PathLike = Union[str, "os.PathLike[str]"]

_JPEG_SUFFIXES = (".jpg", ".jpeg")


def _fail(path: PathLike, problem: str) -> HandsoffError:
    return HandsoffError(f"{os.fspath(path)}: {problem}")


def _describe_channels(channels: int) -> str:
    return {1: "grayscale (1 channel)", 2: "grayscale with alpha (2 channels)",
            4: "RGBA (4 channels, with alpha)"}.get(channels, f"{channels} channels")


def read_rgb_image(path: PathLike) -> np.ndarray:
    """Read an 8-bit RGB image file (PNG, JPEG, ...) as uint8 ``[H, W, 3]`` in RGB order.

    Raises:
        HandsoffError: one line naming ``path``: unreadable or empty, grayscale, with an alpha
            channel, or not 8 bits per channel.
    """
    p = Path(path)
    # IMREAD_UNCHANGED keeps the file's channels and depth, which IMREAD_COLOR would hide.
    pixels = cv2.imread(str(p), cv2.IMREAD_UNCHANGED) if p.is_file() else None
    if pixels is None or pixels.size == 0:
        raise _fail(p, "unreadable or empty image")
    if pixels.dtype != np.uint8:
        bits = pixels.dtype.itemsize * 8
        raise _fail(p, f"{bits}-bit image ({pixels.dtype}); handsoff reads 8-bit RGB images (convert it first)")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels != 3:
        raise _fail(p, f"{_describe_channels(channels)} image; handsoff reads RGB images without alpha "
                       "(convert it first)")
    if p.suffix.lower() in _JPEG_SUFFIXES:
        # IMREAD_UNCHANGED ignores the EXIF orientation; IMREAD_COLOR applies it, as viewers do.
        pixels = cv2.imread(str(p), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(pixels[:, :, ::-1])


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize uint8 ``[H, W, 3]`` to ``[resolution, resolution, 3]`` (the aspect ratio is not kept).

    Shrinking uses area averaging (cv2.INTER_AREA, no aliasing); enlarging uses bicubic
    interpolation (cv2.INTER_CUBIC).
    """
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    shrink = h >= resolution and w >= resolution
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    return cv2.resize(image, (resolution, resolution), interpolation=interpolation)


def _image_files(folder: Path) -> dict[str, Path]:
    """Images of a labeled-set folder (``folder/images/``) or of a plain folder, by name."""
    # Imported here: labeled_set imports this module for its image reader.
    from handsoff.data.labeled_set import _list_images

    if not folder.is_dir():
        raise _fail(folder, "no such folder")
    return _list_images(folder / "images" if (folder / "images").is_dir() else folder)


def read_image_folder(folder: PathLike, resolution: Optional[int] = None,
                      resize: bool = False) -> tuple[list[str], np.ndarray]:
    """Read every image of a folder into one array.

    Args:
        folder: a labeled-set folder (its ``images/`` are read) or a plain folder of
            ``.png``/``.jpg``/``.jpeg`` files; hidden files and other suffixes are skipped.
        resolution: the size every image must have (``resolution x resolution``); None = any
            size, but one size for all.
        resize: resize images of another size to ``resolution`` (see `resize_image`) instead of
            refusing them.

    Returns:
        ``(names, images)``: the file stems, sorted, and uint8 ``[N, H, W, 3]`` RGB.

    Raises:
        HandsoffError: one line naming the offending file (see `read_rgb_image`), or an image of
            the wrong size.
    """
    files = _image_files(Path(folder))
    images = []
    for name, path in files.items():
        image = read_rgb_image(path)
        h, w = image.shape[:2]
        want = (resolution, resolution) if resolution is not None else (images[0].shape[:2] if images else (h, w))
        if (h, w) != want:
            if resize and resolution is not None:
                image = resize_image(image, resolution)
            else:
                hint = " (pass --resize to resize it, or resize=True in Python)" if resolution is not None else ""
                raise _fail(path, f"image is {w}x{h}, expected {want[1]}x{want[0]}{hint}")
        images.append(image)
    return list(files), np.stack(images)
