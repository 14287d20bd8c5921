"""The generation engine: sample, label, score, filter and write a corpus of HDF5 shards.

A run of ``n`` samples is cut into shards of ``shard_size`` consecutive sample indices;
shard ``k`` covers indices ``[k * shard_size, min((k + 1) * shard_size, n))`` and sample
``i`` is drawn from seed ``seed + i`` (`handsoff.synth.sampling`). Each shard is
self-contained: it is generated in batches, labeled, its ``floor(filter * generated)`` most
uncertain samples are dropped (per shard, so that a shard never depends on another), and
it is written by a background thread while the next shard is computed.

Crash safety and resume (DESIGN.md section 6): a shard is written under a temporary name
and renamed when complete, then listed in the manifest with its sha256; the manifest is
replaced atomically. Rerunning the same command skips every listed shard whose file still
has its sha256 and makes the others again, byte for byte the same; a folder made with
other settings is refused. ``DIR/.lock`` (`handsoff.synth.lock`) keeps a second run out.

Several processes (torchrun): the shards still to do are dealt round-robin to the ranks;
each rank writes its shards and lists them in its own manifest part
(``manifest.part-RANK.json``, replaced atomically after each shard); after a barrier rank 0
merges the parts into ``manifest.json``. Rank 0 also merges parts left by a killed run
before planning, so nothing finished is lost and nothing partial is listed. Several machines
must write into one shared folder (the lock is rank 0's ``flock``; NFS needs working locks).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from handsoff.data.shards import (MANIFEST_NAME, Manifest, ShardEntry, ShardRecords, read_manifest, shard_name,
                                  write_manifest, write_shard)
from handsoff.errors import HandsoffError
from handsoff.gan.digest import generator_digest
from handsoff.label.prediction import LabelPrediction
from handsoff.utils.distributed import Ranks, barrier, broadcast, gather
from handsoff.synth.lock import corpus_lock
from handsoff.synth.sampling import LatentSampler, candidate_seed
from handsoff.synth.settings import GenerateSettings
from handsoff.synth.writer import BackgroundWriter
from handsoff.utils.io import PathLike, atomic_write_bytes, sha256_file

__all__ = ["LabelFn", "LabelerInfo", "ShardPlan", "GenerateResult", "plan_shards", "drop_count", "filter_mask",
           "wanted_indices", "corpus_identity", "generate_corpus", "REPORT_NAME", "PREVIEW_NAME"]

#: ``label_fn(ws) -> (images uint8 [B, H, W, 3], LabelPrediction)``: synthesises and labels W+ codes.
LabelFn = Callable[[torch.Tensor], "tuple[np.ndarray, LabelPrediction]"]

REPORT_NAME = "report.json"
PREVIEW_NAME = "preview.png"
_PART_PREFIX = "manifest.part-"


@dataclass(frozen=True)
class LabelerInfo:
    """What a labeler predicts, and its fingerprint (recorded in the manifest and shards).

    Attributes:
        classes: segmentation class names (empty: no segmentation).
        keypoint_names: keypoint names (empty: no keypoints).
        depth: whether it predicts depth.
        digest: a fingerprint of the labeler (e.g. the sha256 of its file).
        resolution: side of the images and label maps it returns (the labeler's label
            resolution); None = the generator's resolution.
    """

    classes: tuple[str, ...] = ()
    keypoint_names: tuple[str, ...] = ()
    depth: bool = False
    digest: str = ""
    resolution: Optional[int] = None


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``shard`` covers the run's sample indices ``[start, stop)``."""

    shard: int
    start: int
    stop: int

    @property
    def generated(self) -> int:
        return self.stop - self.start


@dataclass
class GenerateResult:
    """What `generate_corpus` leaves: the folder, its manifest and the run report (rank 0's)."""

    out: Path
    manifest: Manifest
    report: dict[str, Any] = field(default_factory=dict)


def plan_shards(n: int, shard_size: int) -> list[ShardPlan]:
    """The shards of a run of ``n`` samples."""
    return [ShardPlan(k, start, min(start + shard_size, n)) for k, start in enumerate(range(0, n, shard_size))]


def filter_mask(uncertainty: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean ``[N]`` mask of the samples kept when the ``floor(fraction * N)`` most uncertain
    are dropped. NaN counts as most uncertain; ties drop the earlier sample (stable order)."""
    n = len(uncertainty)
    drop = drop_count(n, fraction)
    keep = np.ones(n, dtype=bool)
    if drop:
        score = np.nan_to_num(uncertainty.astype(np.float64), nan=np.inf)
        keep[np.argsort(-score, kind="stable")[:drop]] = False
    return keep


def drop_count(generated: int, fraction: float) -> int:
    """How many of ``generated`` samples the filter drops: ``floor(fraction * generated)``."""
    return int(fraction * generated + 1e-9)  # floor, robust to 0.29 * 100 = 28.999...


def wanted_indices(index: np.ndarray, ratio: float) -> np.ndarray:
    """Which sample indices must hold the wanted class: ``floor((i + 1) * ratio) > floor(i * ratio)``
    (an even spread: ratio 0.5 picks every second index, 1 picks all)."""
    i = index.astype(np.float64)
    return np.floor((i + 1) * ratio + 1e-9) > np.floor(i * ratio + 1e-9)


def corpus_identity(settings: GenerateSettings, generator: str, labeler: str, resolution: int,
                    around: Optional[str] = None) -> dict[str, Any]:
    """Everything that fixes a corpus's bytes; a resumed run must match it (``resolution``: of
    the stored images and labels)."""
    return {"settings": settings.to_dict(), "generator_digest": generator, "labeler_digest": labeler,
            "around_digest": around, "resolution": resolution}


def _identity_digest(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} there, {b!r} now")
    return out


# ---------------------------------------------------------------------------------------------
# Labeling a batch of sample indices

def _records(images: np.ndarray, pred: LabelPrediction, seeds: np.ndarray, index: np.ndarray,
             ws: Optional[torch.Tensor], resolution: int) -> ShardRecords:
    """A labeler's output as storable records (checked: a wrong shape here would corrupt a shard)."""
    b = len(index)
    if images.dtype != np.uint8 or images.shape != (b, resolution, resolution, 3) or len(pred) != b:
        raise ValueError(f"labeler returned {images.dtype} images {images.shape} and {len(pred)} predictions "
                         f"for {b} latents (expected uint8 [{b}, {resolution}, {resolution}, 3])")
    return ShardRecords(
        images=np.ascontiguousarray(images), seeds=seeds.astype(np.int64), index=index.astype(np.int64),
        uncertainty=np.asarray(pred.uncertainty, dtype=np.float32),
        scores={k: np.asarray(v, dtype=np.float32) for k, v in pred.scores.items()},
        seg=None if pred.seg is None else pred.seg.astype(np.uint8),
        depth=None if pred.depth is None else pred.depth.astype(np.float16),
        keypoints=None if pred.keypoints is None else pred.keypoints.astype(np.float32),
        ws=None if ws is None else ws.detach().float().cpu().numpy())


class _Labeling:
    """Labels batches of sample indices; with ``want_class``, retries wanted indices whose
    sample lacks the class (`handsoff.synth.sampling.candidate_seed`)."""

    def __init__(self, sampler: LatentSampler, label_fn: LabelFn, settings: GenerateSettings,
                 want_id: Optional[int], resolution: int) -> None:
        self.sampler, self.label_fn, self.settings, self.want_id = sampler, label_fn, settings, want_id
        self.resolution = resolution

    def _attempt(self, index: np.ndarray, attempt: int) -> ShardRecords:
        seeds = np.array([candidate_seed(self.settings.seed, int(i), attempt) for i in index], dtype=np.int64)
        ws = self.sampler.ws(index, seeds)
        images, pred = self.label_fn(ws)
        return _records(images, pred, seeds, index, ws if self.settings.store_ws else None, self.resolution)

    def _holds(self, seg: Optional[np.ndarray]) -> np.ndarray:
        assert seg is not None  # checked at start: want_class needs a segmentation labeler
        return (seg == self.want_id).sum(axis=(1, 2)) >= self.settings.want_pixels

    def __call__(self, index: np.ndarray) -> tuple[ShardRecords, Counter]:
        records = self._attempt(index, 0)
        stats: Counter = Counter()
        if self.want_id is None:
            return records, stats
        wanted = wanted_indices(index, self.settings.want_ratio)
        holds = self._holds(records.seg)
        stats["want_candidates"] += int(wanted.sum())
        for attempt in range(1, self.settings.want_tries):
            retry = np.flatnonzero(wanted & ~holds)
            if retry.size == 0:
                break
            again = self._attempt(index[retry], attempt)
            records.put(retry, again)
            holds[retry] = self._holds(again.seg)
            stats["want_candidates"] += int(retry.size)
        stats["want_indices"] += int(wanted.sum())
        stats["want_accepted"] += int((wanted & holds).sum())
        return records, stats


# ---------------------------------------------------------------------------------------------
# The manifest of a run in progress

class _ManifestStore:
    """Lists finished shards: in ``manifest.json`` (one process) or in this rank's part file."""

    def __init__(self, out: Path, manifest: Manifest, ranks: Ranks) -> None:
        self.out, self.manifest, self.ranks = out, manifest, ranks
        self.mine: list[ShardEntry] = []
        self.part = out / f"{_PART_PREFIX}{ranks.rank:05d}.json"

    def record(self, entry: ShardEntry) -> None:
        self.mine.append(entry)
        self.manifest = self.manifest.with_shard(entry)
        try:
            if self.ranks.world == 1:
                write_manifest(self.out, self.manifest)
            else:
                _write_part(self.part, self.manifest.identity, self.mine)
        except OSError as err:
            raise HandsoffError(f"{self.out / MANIFEST_NAME}: cannot update the manifest ({os.strerror(err.errno)}); "
                                f"finished shards are intact, rerun the same command to resume") from None


def _write_part(path: Path, identity: Mapping[str, Any], entries: Sequence[ShardEntry]) -> None:
    data = {"identity_digest": _identity_digest(identity), "shards": [e.to_json() for e in entries]}
    atomic_write_bytes(path, (json.dumps(data, sort_keys=True) + "\n").encode())


def _merge_parts(out: Path, manifest: Manifest) -> Manifest:
    """``manifest`` plus the entries of every part file of this identity; the parts are removed."""
    digest = _identity_digest(manifest.identity)
    for part in sorted(out.glob(f"{_PART_PREFIX}*.json")):
        try:
            data = json.loads(part.read_text(encoding="utf-8"))
            if data.get("identity_digest") == digest:
                for entry in data["shards"]:
                    manifest = manifest.with_shard(ShardEntry.from_json(entry))
        except (OSError, ValueError, KeyError, TypeError) as err:
            _say(f"note: ignoring unreadable {part.name} ({err}); its shards are made again")
    return manifest


def _remove_parts(out: Path) -> None:
    for part in out.glob(f"{_PART_PREFIX}*.json"):
        part.unlink(missing_ok=True)


def _verified(out: Path, manifest: Manifest) -> Manifest:
    """``manifest`` without the shards whose file is missing or fails its size or sha256."""
    bad = set()
    for entry in manifest.shards:
        path = out / entry.file
        if not path.is_file() or path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            _say(f"note: {path} is missing or fails its sha256; making it again")
            bad.add(entry.shard)
    return manifest.without_shards(bad)


def _remove_temporaries(out: Path) -> None:
    """Files a killed run left under temporary names (`handsoff.utils.io.atomic_path`)."""
    for pattern in (".shard-*.tmp", f".{MANIFEST_NAME}.*.tmp", f".{_PART_PREFIX}*.tmp"):
        for tmp in out.glob(pattern):
            tmp.unlink(missing_ok=True)


def _prepare(out: Path, fresh: Manifest) -> Manifest:
    """Rank 0, holding the lock: check an existing corpus against ``fresh`` and return the
    manifest to continue from (written to disk), or ``fresh`` for a new corpus."""
    _remove_temporaries(out)
    existing = read_manifest(out)
    if existing is not None and existing.identity != fresh.identity:
        diff = "; ".join(_differences(existing.identity, fresh.identity)[:4])
        raise HandsoffError(f"{out / MANIFEST_NAME}: this folder holds a corpus made with other settings ({diff}); "
                            f"rerun with the same settings to resume, or choose another --out")
    manifest = _verified(out, _merge_parts(out, existing or fresh))
    write_manifest(out, manifest)
    _remove_parts(out)
    return manifest


# ---------------------------------------------------------------------------------------------
# Writing shards (in the writer thread)

@dataclass
class _ShardWork:
    plan: ShardPlan
    parts: list[ShardRecords]
    stats: Counter


class _ShardSink:
    """Filters a computed shard, writes it and lists it (runs in the writer thread)."""

    def __init__(self, out: Path, store: _ManifestStore, settings: GenerateSettings, info: LabelerInfo,
                 identity: Mapping[str, Any]) -> None:
        self.out, self.store, self.settings, self.info, self.identity = out, store, settings, info, identity

    def __call__(self, work: _ShardWork) -> None:
        records = ShardRecords.concat(work.parts)
        keep = filter_mask(records.uncertainty, self.settings.filter)
        if self.settings.keep_all:
            records.keep = keep
        else:
            records = records.select(keep)
        plan = work.plan
        attrs = {"shard": plan.shard, "indices": [plan.start, plan.stop], "generated": plan.generated,
                 "kept": len(records), "generator_digest": self.identity["generator_digest"],
                 "labeler_digest": self.identity["labeler_digest"], "identity": self.identity}
        path = self.out / shard_name(plan.shard)
        try:
            write_shard(path, records, attrs, classes=self.info.classes, keypoint_names=self.info.keypoint_names)
            digest, size = sha256_file(path), path.stat().st_size
        except OSError as err:
            raise HandsoffError(f"{path}: cannot write the shard ({os.strerror(err.errno) if err.errno else err}); "
                                f"finished shards are intact, rerun the same command to resume") from None
        self.store.record(ShardEntry(path.name, plan.shard, (plan.start, plan.stop), plan.generated, len(records),
                                     digest, size, dict(sorted(work.stats.items()))))


# ---------------------------------------------------------------------------------------------
# The run

def _check_labeler(info: LabelerInfo, settings: GenerateSettings) -> Optional[int]:
    """The class id of ``want_class`` (None without it)."""
    if settings.want_class is None:
        return None
    if settings.want_class not in info.classes:
        known = ", ".join(info.classes) or "none: the labeler has no segmentation"
        raise HandsoffError(f"generate: --want-class {settings.want_class!r} is not a class of the labeler ({known})")
    return info.classes.index(settings.want_class)


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def _start(out: Path, fresh: Manifest, ranks: Ranks, lock_stack: Any) -> Manifest:
    """Rank 0 locks the folder and prepares the manifest; every rank gets it (or rank 0's error)."""
    manifest: Optional[Manifest] = None
    error: Optional[str] = None
    if ranks.main:
        try:
            lock_stack.enter_context(corpus_lock(out))
            manifest = _prepare(out, fresh)
        except HandsoffError as err:
            error = str(err)
        except OSError as err:
            error = f"{out}: cannot write here ({os.strerror(err.errno) if err.errno else err})"
    manifest, error = broadcast(ranks, (manifest, error))
    if error is not None:
        raise HandsoffError(error)
    assert manifest is not None
    return manifest


def _compute(plans: Sequence[ShardPlan], labeling: _Labeling, writer: BackgroundWriter, batch: int, bar: Any) -> int:
    """Label every planned shard batch by batch and hand each finished shard to the writer."""
    done = 0
    for plan in plans:
        parts, stats = [], Counter()
        for start in range(plan.start, plan.stop, batch):
            records, counts = labeling(np.arange(start, min(start + batch, plan.stop), dtype=np.int64))
            parts.append(records)
            stats.update(counts)
            bar.update(len(records))
            done += len(records)
        writer.put(_ShardWork(plan, parts, stats))
    return done


def generate_corpus(G: torch.nn.Module, label_fn: LabelFn, info: LabelerInfo, out_dir: PathLike,
                    settings: GenerateSettings, *, batch: int = 16, around: Optional[torch.Tensor] = None,
                    ranks: Optional[Ranks] = None, progress: bool = True, sources: Optional[Mapping[str, Any]] = None,
                    preview: bool = True) -> GenerateResult:
    """Generate (or resume) the corpus ``settings`` describes into ``out_dir``.

    Args:
        G: the generator (its device is where latents are made).
        label_fn: synthesises and labels a batch of W+ codes (see `LabelFn`), e.g. from
            `handsoff.synth.labeling.load_labeling`.
        info: what ``label_fn`` predicts and its digest.
        out_dir: the corpus folder (created; resumed when it holds this corpus).
        settings: what to generate (see `GenerateSettings`).
        batch: latents per labeler call (a compute setting: bytes are identical for the
            same batch, device and thread count).
        around: W+ codes to make variations of (``--around``), or None.
        ranks: this process's rank under torchrun (default: a single process).
        progress: show a tqdm bar (rank 0) with samples/s and ETA.
        sources: recorded in the report (e.g. checkpoint paths).
        preview: write ``preview.png`` (rank 0).

    Returns:
        The folder, its final manifest and (on rank 0) the report written to ``report.json``.

    Raises:
        HandsoffError: bad settings, a folder holding another corpus or locked by another
            run, an unwritable folder or a full disk (finished shards stay listed and intact).
    """
    from tqdm.auto import tqdm

    ranks = ranks or Ranks()
    out = Path(out_dir)
    settings.validate(around=around is not None)
    if batch < 1:
        raise HandsoffError(f"generate: --batch must be at least 1 (got {batch})")
    want_id = _check_labeler(info, settings)
    sampler = LatentSampler(G, settings, around)
    if around is not None:  # record the mixing layer actually used
        settings = GenerateSettings(**{**settings.to_dict(), "mix_from": sampler.mix_from})
    resolution = int(info.resolution or G.img_resolution)
    identity = corpus_identity(settings, generator_digest(G), info.digest, resolution,
                               None if around is None else _tensor_digest(around))
    plans = plan_shards(settings.n, settings.shard_size)
    fresh = Manifest(identity, resolution, tuple(info.classes), tuple(info.keypoint_names), bool(info.depth),
                     len(plans))
    with ExitStack() as lock_stack:
        manifest = _start(out, fresh, ranks, lock_stack)
        started = time.perf_counter()  # speed counts generation and writing, not the checks above
        finished = {e.shard for e in manifest.shards}
        mine = [p for p in plans if p.shard not in finished][ranks.rank::ranks.world]
        store = _ManifestStore(out, manifest, ranks)
        labeling = _Labeling(sampler, label_fn, settings, want_id, resolution)
        with tqdm(total=sum(p.generated for p in mine), unit="img", desc="generate", dynamic_ncols=True,
                  disable=not (progress and ranks.main)) as bar:
            with BackgroundWriter(_ShardSink(out, store, settings, info, identity), maxsize=1) as writer:
                generated = _compute(mine, labeling, writer, batch, bar)
        seconds = time.perf_counter() - started
        runs = gather(ranks, {"generated": generated, "shards": len(mine), "seconds": seconds})
        barrier(ranks)
        result = GenerateResult(out, store.manifest)
        if ranks.main:
            run = {"generated": sum(r["generated"] for r in runs), "shards_written": sum(r["shards"] for r in runs),
                   "shards_skipped": len(finished), "seconds": round(max(r["seconds"] for r in runs), 3),
                   "processes": ranks.world, "batch": batch, "device": str(next(G.parameters()).device),
                   "torch_threads": torch.get_num_threads()}
            try:
                _finish(out, result, ranks, run, sources or {}, preview)
            except OSError as err:
                raise HandsoffError(f"{out}: cannot write the manifest, report or preview "
                                    f"({os.strerror(err.errno) if err.errno else err}); finished shards are "
                                    f"intact, rerun the same command to finish") from None
    return result


def _finish(out: Path, result: GenerateResult, ranks: Ranks, run: Mapping[str, Any], sources: Mapping[str, Any],
            preview: bool) -> None:
    """Rank 0 after the barrier: merge the ranks' manifest parts, write the report and preview."""
    from handsoff.synth.report import build_report, write_preview

    if ranks.world > 1:
        result.manifest = _merge_parts(out, result.manifest)
        write_manifest(out, result.manifest)
        _remove_parts(out)
    result.report = build_report(result.manifest, run, sources)
    atomic_write_bytes(out / REPORT_NAME, (json.dumps(result.report, indent=1) + "\n").encode())
    if preview and result.manifest.shards:
        write_preview(out, result.manifest, out / PREVIEW_NAME)
