"""Export a generated corpus to the labeled-set folder format, which any framework can read.

Sample names are ``i{index:08d}_s{seed}`` (its index in the run and its seed). Keypoints
become ``[x, y, visible]`` with ``visible = confidence >= min_confidence`` (default 0.5) and
the point inside the image (the folder format requires visible points to lie inside it).
Depth is written as float32 (shards store float16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from handsoff.data.labeled_set import write_labeled_set
from handsoff.data.shards import MANIFEST_NAME, Manifest, ShardRecords, read_manifest, read_shard
from handsoff.domains.base import LabeledBatch
from handsoff.errors import HandsoffError
from handsoff.utils.io import PathLike

__all__ = ["export_folder", "VISIBLE_CONFIDENCE", "EXPORT_FORMATS"]

#: A predicted keypoint counts as visible from this confidence on.
VISIBLE_CONFIDENCE = 0.5
EXPORT_FORMATS = ("folder",)


def _to_batch(records: ShardRecords, min_confidence: float) -> LabeledBatch:
    """Shard samples (images and labels at one resolution) as a labeled batch."""
    assert records.seg is not None and records.depth is not None and records.keypoints is not None
    h, w = records.images.shape[1:3]
    points = records.keypoints.astype(np.float32).copy()
    inside = (points[..., 0] >= 0) & (points[..., 0] <= w) & (points[..., 1] >= 0) & (points[..., 1] <= h)
    points[..., 2] = ((points[..., 2] >= min_confidence) & inside).astype(np.float32)
    names = [f"i{int(i):08d}_s{int(s)}" for i, s in zip(records.index, records.seeds)]
    return LabeledBatch(images=records.images, seg=records.seg, depth=records.depth.astype(np.float32),
                        keypoints=points, names=names)


def _check_exportable(root: Path, manifest: Manifest) -> None:
    missing = [name for name, present in (("segmentation", manifest.classes), ("depth", manifest.depth),
                                          ("keypoints", manifest.keypoint_names)) if not present]
    if missing:
        raise HandsoffError(f"{root / MANIFEST_NAME}: the folder format needs segmentation, depth and keypoints; "
                            f"this corpus has no {', '.join(missing)}")
    if not manifest.shards:
        raise HandsoffError(f"{root / MANIFEST_NAME}: lists no finished shards")


def export_folder(corpus: PathLike, out: PathLike, *, overwrite: bool = False, progress: bool = True,
                  min_confidence: float = VISIBLE_CONFIDENCE) -> Path:
    """Write every listed shard of ``corpus`` as one labeled-set folder ``out`` (atomically).

    ``min_confidence``: keypoints with at least this confidence (and inside the image) are
    written as visible.

    Returns:
        ``out`` as a Path.

    Raises:
        HandsoffError: ``corpus`` is not a corpus, lacks a kind of label, or ``out`` exists
            (and ``overwrite`` is False).
    """
    from tqdm.auto import tqdm

    root = Path(corpus)
    manifest = read_manifest(root)
    if manifest is None:
        raise HandsoffError(f"{root}: no {MANIFEST_NAME} (not a generated corpus folder)")
    _check_exportable(root, manifest)
    meta = {"classes": list(manifest.classes), "keypoint_names": list(manifest.keypoint_names),
            "source": "handsoff generate", "corpus_identity": manifest.identity,
            "keypoint_visible": f"confidence >= {min_confidence} and inside the image"}

    def batches(bar: tqdm) -> Iterator[LabeledBatch]:
        for entry in manifest.shards:
            batch = _to_batch(read_shard(root / entry.file)[0], min_confidence)
            yield batch
            bar.update(len(batch))

    with tqdm(total=manifest.kept, unit="img", desc="export", disable=not progress) as bar:
        return write_labeled_set(batches(bar), out, meta, overwrite=overwrite)
