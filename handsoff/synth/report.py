"""What a generation run leaves besides the shards: ``report.json`` and ``preview.png``."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from handsoff.data.shards import Manifest, ShardRecords, read_shard
from handsoff.domains.preview import depth_colours, draw_keypoints, seg_colours
from handsoff.synth.engine import drop_count
from handsoff.utils.images import image_grid, save_png

__all__ = ["build_report", "preview_picture", "write_preview", "REPORT_FORMAT"]

REPORT_FORMAT = "handsoff-generate-report"
_PREVIEW_ITEMS = 16


def _want_summary(manifest: Manifest) -> dict[str, Any]:
    totals = {k: sum(int(e.stats.get(k, 0)) for e in manifest.shards)
              for k in ("want_indices", "want_candidates", "want_accepted")}
    return {"class": manifest.identity["settings"]["want_class"], "indices": totals["want_indices"],
            "candidates": totals["want_candidates"], "accepted": totals["want_accepted"],
            "acceptance_rate": round(totals["want_accepted"] / totals["want_candidates"], 4)
            if totals["want_candidates"] else None,
            "indices_holding_class": round(totals["want_accepted"] / totals["want_indices"], 4)
            if totals["want_indices"] else None}


def build_report(manifest: Manifest, run: Mapping[str, Any], sources: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report of a run.

    Counts come from the manifest (the whole corpus, resumed shards included); speed comes
    from ``run`` (this invocation: ``generated`` samples in ``seconds``, ...).

    Keys: ``complete``, ``shards`` (planned / finished), ``generated``, ``kept``, ``dropped``,
    ``filtered_fraction`` (dropped / generated), ``flagged_uncertain`` (what the filter
    marks; equals ``dropped`` unless ``keep_all``), ``samples_per_s`` (generated samples per
    second of this invocation, all processes), ``this_run``, ``settings``, the generator,
    labeler and ``--around`` digests, ``labels`` (classes, keypoint names, depth),
    ``want_class`` (with ``--want-class``: candidates tried, accepted, acceptance rate),
    ``sources``, ``finished_at`` and ``bytes_depend_on`` (device, batch and torch threads of this
    run: shards made with others hold other bytes).
    """
    identity = manifest.identity
    settings = identity["settings"]
    generated, kept = manifest.generated, manifest.kept
    seconds = float(run.get("seconds", 0.0))
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "complete": manifest.complete,
        "shards": {"planned": manifest.planned, "finished": len(manifest.shards)},
        "generated": generated,
        "kept": kept,
        "dropped": generated - kept,
        "filtered_fraction": round((generated - kept) / generated, 6) if generated else 0.0,
        "flagged_uncertain": sum(drop_count(e.generated, settings["filter"]) for e in manifest.shards),
        "samples_per_s": round(run["generated"] / seconds, 2) if seconds > 0 and run.get("generated") else 0.0,
        "this_run": dict(run),
        # The same settings and seeds give the same bytes only with these compute settings too.
        "bytes_depend_on": {key: run.get(key) for key in ("device", "batch", "torch_threads")},
        "settings": settings,
        "generator_digest": identity["generator_digest"],
        "labeler_digest": identity["labeler_digest"],
        "around_digest": identity["around_digest"],
        "labels": {"resolution": manifest.resolution, "classes": list(manifest.classes),
                   "keypoint_names": list(manifest.keypoint_names), "depth": manifest.depth},
        "sources": {k: str(v) for k, v in sources.items()},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if settings.get("want_class") is not None:
        report["want_class"] = _want_summary(manifest)
    return report


def _panels(records: ShardRecords, i: int, scale: int) -> list[np.ndarray]:
    """Image, then the labels the corpus has: seg overlay, depth, keypoints (confidence >= 0.5 filled)."""
    image = records.images[i]

    def up(x: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)

    panels = [up(image)]
    if records.seg is not None:
        panels.append(up(seg_colours(image, records.seg[i])))
    if records.depth is not None:
        panels.append(up(depth_colours(records.depth[i].astype(np.float32))))
    if records.keypoints is not None:
        points = records.keypoints[i].copy()
        points[:, 2] = points[:, 2] >= 0.5
        panels.append(draw_keypoints(up(image), points, scale))
    return panels


def preview_picture(records: ShardRecords, max_items: int = _PREVIEW_ITEMS, per_row: int = 4,
                    min_tile: int = 128) -> np.ndarray:
    """One picture of the first ``max_items`` samples: per sample the image and its labels side by
    side (the layout of `handsoff.domains.preview.label_grid`, for whichever labels exist)."""
    count = min(len(records), max_items)
    if count == 0:
        raise ValueError("preview_picture: no samples")
    scale = max(1, -(-min_tile // records.images.shape[1]))
    tiles = []
    for i in range(count):
        panels = _panels(records, i, scale)
        gap = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1))
    return image_grid(np.stack(tiles), cols=min(per_row, count), pad=6)


def write_preview(out: Path, manifest: Manifest, path: Path, shard_files: Sequence[str] = ()) -> Path:
    """Write ``path`` from the first samples of the corpus's first listed shard."""
    files = list(shard_files) or [e.file for e in manifest.shards[:1]]
    records = read_shard(out / files[0])[0]
    save_png(path, preview_picture(records))
    return path
