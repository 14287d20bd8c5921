"""The labeled-set folder format (DESIGN.md section 6): an atomic writer and a validating reader.

::

    images/NAME.png|jpg|jpeg   RGB
    seg/NAME.png               uint8 class index, 255 = ignore          (optional)
    depth/NAME.npy             float32 depth                            (optional)
    keypoints.json             {"names": [...], "points": {NAME: [[x, y, visible], ...]}}  (optional)
    meta.json                  {"classes": [...], "keypoint_names": [...], ...}

Keypoint ``x, y`` are in pixels with the pixel in column ``j``, row ``i`` covering
``[j, j+1) x [i, i+1)``; a visible keypoint must lie inside ``[0, W] x [0, H]``, an invisible
one may lie anywhere (e.g. outside the frame). A label folder (``seg/``, ``depth/``) or
``keypoints.json``, when present, must cover every image; ``seg/`` needs ``meta.json`` with
the class names. Every problem raises `HandsoffError` with a one-line message that names the
file and the problem.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from handsoff.data.images import read_rgb_image
from handsoff.domains.base import Domain, LabeledBatch
from handsoff.errors import HandsoffError

__all__ = ["IGNORE_INDEX", "IMAGE_SUFFIXES", "LabeledSet", "write_labeled_set", "read_labeled_set",
           "render_to_folder"]

PathLike = Union[str, "os.PathLike[str]"]

#: Segmentation value that means "no label here".
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _fail(path: PathLike, problem: str) -> HandsoffError:
    return HandsoffError(f"{os.fspath(path)}: {problem}")


@dataclass(frozen=True)
class LabeledSet:
    """A labeled set read from a folder; images may differ in size.

    Attributes:
        root: the folder.
        names: image names (file stems), sorted.
        images: uint8 ``[H, W, 3]`` RGB per image.
        seg: uint8 ``[H, W]`` class indices per image (255 = ignore), or None.
        depth: float32 ``[H, W]`` per image, or None.
        keypoints: float32 ``[N, K, 3]`` (x, y, visible), or None.
        meta: the contents of meta.json (``{}`` when absent).
    """

    root: Path
    names: list[str]
    images: list[np.ndarray]
    seg: Optional[list[np.ndarray]]
    depth: Optional[list[np.ndarray]]
    keypoints: Optional[np.ndarray]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta.get("classes", ()))

    @property
    def keypoint_names(self) -> tuple[str, ...]:
        return tuple(self.meta.get("keypoint_names", ()))

    def to_batch(self) -> LabeledBatch:
        """Stack into a `LabeledBatch` (needs one image size and all three kinds of labels)."""
        if self.seg is None or self.depth is None or self.keypoints is None:
            raise _fail(self.root, "to_batch needs seg/, depth/ and keypoints.json")
        if len({img.shape for img in self.images}) > 1:
            raise _fail(self.root, "to_batch needs images of one size")
        return LabeledBatch(np.stack(self.images), np.stack(self.seg), np.stack(self.depth),
                            self.keypoints, list(self.names))


# ---------------------------------------------------------------------------------------------
# Writing

def _short_float(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (exact round trip, small JSON)."""
    x32 = np.float32(x)
    short = float(np.format_float_positional(x32, unique=True, trim="-"))
    return short if np.float32(short) == x32 else float(x32)


def _check_batch(batch: LabeledBatch, classes: int, keypoints: int, seen: set[str], out: Path) -> None:
    """Refuse to write what the reader would refuse to read."""
    for name in batch.names:
        if not _NAME.fullmatch(name):
            raise _fail(out, f"image name {name!r} is not a safe file name (letters, digits, '_', '-', '.')")
        if name in seen:
            raise _fail(out, f"image name {name!r} occurs twice")
        seen.add(name)
    bad = (batch.seg >= classes) & (batch.seg != IGNORE_INDEX)
    if bad.any():
        i = int(np.argwhere(bad.any(axis=(1, 2)))[0, 0])
        raise _fail(out, f"seg of {batch.names[i]!r} holds class {int(batch.seg[i][bad[i]][0])} "
                         f"but meta lists {classes} classes")
    if batch.keypoints.shape[1] != keypoints:
        raise _fail(out, f"batch has {batch.keypoints.shape[1]} keypoints but meta names {keypoints}")
    h, w = batch.seg.shape[1:]
    for i, name in enumerate(batch.names):
        _check_points(batch.keypoints[i], w, h, out, name)


def _write_batch(batch: LabeledBatch, root: Path, points: dict[str, list[list[float]]]) -> None:
    for i, name in enumerate(batch.names):
        targets = ((root / "images" / f"{name}.png", batch.images[i][:, :, ::-1]),
                   (root / "seg" / f"{name}.png", batch.seg[i]))
        for path, pixels in targets:
            if not cv2.imwrite(str(path), np.ascontiguousarray(pixels)):
                raise _fail(path, "could not write the PNG")
        np.save(root / "depth" / f"{name}.npy", batch.depth[i])
        points[name] = [[_short_float(x), _short_float(y), int(v)] for x, y, v in batch.keypoints[i]]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_keypoints(path: Path, names: list[str], points: dict[str, list[list[float]]]) -> None:
    """keypoints.json with one line per image (readable, and diffs stay small)."""
    lines = [f" {json.dumps(name)}: {json.dumps(pts)}" for name, pts in points.items()]
    body = ",\n".join(lines)
    path.write_text(f'{{"names": {json.dumps(names)},\n"points": {{\n{body}\n}}}}\n', encoding="utf-8")


def write_labeled_set(batches: LabeledBatch | Iterable[LabeledBatch], out_dir: PathLike,
                      meta: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write batches as one labeled-set folder, atomically.

    Everything is written into a temporary sibling folder that is renamed to ``out_dir`` at
    the end; on any error it is removed and ``out_dir`` is left as it was.

    Args:
        batches: one `LabeledBatch` or an iterable of them (e.g. rendered chunk by chunk).
        out_dir: the folder to create.
        meta: written to meta.json; must hold ``classes`` and ``keypoint_names``.
        overwrite: replace an existing non-empty ``out_dir`` (else that is an error).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise _fail(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise _fail(out, "exists and is not empty (replace it with --overwrite, or overwrite=True in Python)")
    classes, keypoint_names = meta.get("classes"), meta.get("keypoint_names")
    if not isinstance(classes, (list, tuple)) or not 0 < len(classes) <= IGNORE_INDEX:
        raise _fail(out, f"meta needs 'classes', a list of 1 to {IGNORE_INDEX} class names")
    if not isinstance(keypoint_names, (list, tuple)):
        raise _fail(out, "meta needs 'keypoint_names', a list of names")
    if isinstance(batches, LabeledBatch):
        batches = [batches]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for sub in ("images", "seg", "depth"):
            (tmp / sub).mkdir(parents=True)
        seen: set[str] = set()
        points: dict[str, list[list[float]]] = {}
        for batch in batches:
            _check_batch(batch, len(classes), len(keypoint_names), seen, out)
            _write_batch(batch, tmp, points)
        if keypoint_names:  # keypoints.json is optional; one with no names would not read back
            _write_keypoints(tmp / "keypoints.json", list(keypoint_names), points)
        _write_json(tmp / "meta.json", {**meta, "classes": list(classes), "keypoint_names": list(keypoint_names),
                                        "count": len(points)})
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and then deleted."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def render_to_folder(domain: Domain, n: int, seed: int, size: int, out_dir: PathLike, chunk: int = 256,
                     overwrite: bool = False, progress: bool = True, workers: int = 1) -> Path:
    """Render images ``0 .. n-1`` of ``domain``'s sequence ``seed`` into a labeled-set folder.

    Renders ``chunk`` images at a time (memory stays bounded; ``workers`` > 1 renders in that
    many processes, see `handsoff.domains.parallel.render_chunks`) with a tqdm progress bar;
    the folder appears atomically when all are written. ``handsoff render`` calls this.
    """
    from tqdm import tqdm

    from handsoff.domains.parallel import render_chunks

    if n < 1 or chunk < 1 or workers < 1:
        raise HandsoffError(f"render: need n >= 1, chunk >= 1 and workers >= 1 (got n={n}, chunk={chunk}, "
                            f"workers={workers})")
    meta = {"classes": list(domain.classes), "keypoint_names": list(domain.keypoint_names),
            "domain": domain.name, "seed": seed, "size": size}
    far = getattr(domain, "far_depth", None)
    if far is not None:
        meta["background_depth"] = far

    def chunks(bar: tqdm) -> Iterator[LabeledBatch]:
        for batch in render_chunks(domain, n, seed, size, chunk=chunk, workers=workers):
            yield batch
            bar.update(len(batch))

    with tqdm(total=n, unit="img", desc=f"render {domain.name}", disable=not progress) as bar:
        return write_labeled_set(chunks(bar), out_dir, meta, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Reading

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"cannot read JSON ({' '.join(str(exc).split())})") from None


def _list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise _fail(folder, "missing images folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise _fail(path, f"two images named {path.stem!r} ({found[path.stem].name}, {path.name})")
        found[path.stem] = path
    if not found:
        raise _fail(folder, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _read_image(path: Path) -> np.ndarray:
    return read_rgb_image(path)


def _label_files(folder: Path, names: list[str], suffix: str) -> list[Path]:
    """The label file of every image; a missing one or a stray one is an error."""
    expected = {name: folder / f"{name}{suffix}" for name in names}
    for name, path in expected.items():
        if not path.is_file():
            raise _fail(path, f"missing: {folder.name}/ must cover every image (none for {name!r})")
    strays = sorted(p.name for p in folder.iterdir()
                    if p.suffix == suffix and not p.name.startswith(".") and p.stem not in expected)
    if strays:
        raise _fail(folder / strays[0], "has no matching image")
    return list(expected.values())


def _read_seg(path: Path, shape: tuple[int, int], classes: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise _fail(path, f"label map must be a single-channel class-index PNG, got mode {img.mode}")
            labels = np.array(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise _fail(path, f"unreadable label map ({' '.join(str(exc).split())})") from None
    if labels.shape != shape:
        raise _fail(path, f"label map is {labels.shape[1]}x{labels.shape[0]} but its image is {shape[1]}x{shape[0]}")
    bad = (labels >= classes) & (labels != IGNORE_INDEX)
    if bad.any():
        raise _fail(path, f"class id {int(labels[bad].max())} outside 0..{classes - 1} (255 = ignore)")
    return labels


def _read_depth(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        depth = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(path, f"unreadable depth ({' '.join(str(exc).split())})") from None
    if depth.shape != shape or depth.dtype.kind != "f":
        raise _fail(path, f"depth must be float [{shape[0]}, {shape[1]}] like its image, "
                          f"got {depth.dtype} {list(depth.shape)}")
    if np.isnan(depth).any():
        raise _fail(path, "depth holds NaN")
    return depth.astype(np.float32, copy=False)


def _check_points(points: np.ndarray, width: int, height: int, path: Path, name: str,
                  names: tuple[str, ...] = ()) -> None:
    if not np.isfinite(points).all() or not np.isin(points[:, 2], (0.0, 1.0)).all():
        raise _fail(path, f"keypoints of {name!r} must be finite [x, y, visible] with visible 0 or 1")
    outside = (points[:, 2] == 1) & ((points[:, 0] < 0) | (points[:, 0] > width)
                                      | (points[:, 1] < 0) | (points[:, 1] > height))
    if outside.any():
        k = int(np.argmax(outside))
        label = f"{names[k]!r} ({k})" if k < len(names) else f"{k}"
        raise _fail(path, f"visible keypoint {label} of {name!r} at ({points[k, 0]:g}, {points[k, 1]:g}) "
                          f"lies outside the {width}x{height} image")


def _read_keypoints(path: Path, names: list[str], sizes: list[tuple[int, int]],
                    meta_names: Optional[list[str]]) -> tuple[np.ndarray, list[str]]:
    data = _read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("names"), list) and isinstance(data.get("points"), dict)):
        raise _fail(path, 'expected {"names": [...], "points": {NAME: [[x, y, visible], ...]}}')
    kp_names = [str(k) for k in data["names"]]
    if meta_names is not None and list(meta_names) != kp_names:
        raise _fail(path, f"keypoint names {kp_names} differ from meta.json's {list(meta_names)}")
    points = data["points"]
    strays = sorted(set(points) - set(names))
    if strays:
        raise _fail(path, f"keypoints for {strays[0]!r}, which has no image")
    out = np.zeros((len(names), len(kp_names), 3), np.float32)
    for i, (name, (h, w)) in enumerate(zip(names, sizes)):
        if name not in points:
            raise _fail(path, f"no keypoints for image {name!r}")
        try:
            entry = np.asarray(points[name], dtype=np.float64)
        except (TypeError, ValueError):
            entry = np.zeros(0)
        if entry.shape != (len(kp_names), 3):
            raise _fail(path, f"keypoints of {name!r} must be {len(kp_names)} triples [x, y, visible]")
        _check_points(entry, w, h, path, name, tuple(kp_names))
        out[i] = entry
    return out, kp_names


def read_labeled_set(path: PathLike) -> LabeledSet:
    """Read and validate a labeled-set folder (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise _fail(root, "no such folder")
    meta_path = root / "meta.json"
    meta: dict[str, Any] = {}
    if meta_path.exists():
        meta = _read_json(meta_path)
        if not isinstance(meta, dict):
            raise _fail(meta_path, "expected a JSON object")
        for key in ("classes", "keypoint_names"):
            if key in meta and not (isinstance(meta[key], list) and all(isinstance(x, str) for x in meta[key])):
                raise _fail(meta_path, f"'{key}' must be a list of names")

    files = _list_images(root / "images")
    names = list(files)
    images = [_read_image(files[name]) for name in names]
    sizes = [img.shape[:2] for img in images]

    seg = None
    if (root / "seg").is_dir():
        if "classes" not in meta:
            raise _fail(meta_path, "seg/ needs meta.json with 'classes' (the class names)")
        classes = len(meta["classes"])
        seg = [_read_seg(p, s, classes) for p, s in zip(_label_files(root / "seg", names, ".png"), sizes)]
    depth = None
    if (root / "depth").is_dir():
        depth = [_read_depth(p, s) for p, s in zip(_label_files(root / "depth", names, ".npy"), sizes)]
    keypoints = None
    if (root / "keypoints.json").exists():
        keypoints, kp_names = _read_keypoints(root / "keypoints.json", names, sizes, meta.get("keypoint_names"))
        meta.setdefault("keypoint_names", kp_names)
    return LabeledSet(root, names, images, seg, depth, keypoints, meta)
