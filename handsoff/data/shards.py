"""The generated-corpus format (DESIGN.md section 6): HDF5 shards plus a JSON manifest.

A corpus is a folder::

    shard-00000.h5     one shard: the kept samples of one contiguous range of sample indices
    shard-00001.h5
    manifest.json      what the corpus is (settings, digests, labels) and its finished shards
    preview.png        (written by `handsoff generate`)
    report.json        (written by `handsoff generate`)

A shard holds N samples (root attributes ``format``, ``version``, ``shard``, ``indices``,
``generator_digest``, ``labeler_digest``, ``settings`` (JSON), ``generated``, ``kept``)::

    images       uint8   [N, H, W, 3]
    seg          uint8   [N, h, w]        attrs: classes (JSON list)        (optional)
    depth        float16 [N, h, w]                                          (optional)
    keypoints    float32 [N, K, 3]        x, y, confidence; attrs: names    (optional)
    uncertainty  float32 [N]              the filtering score (higher = less certain)
    scores/NAME  float32 [N]              per-task scores of the labeler
    seeds        int64   [N]              the seed of each sample's latent
    index        int64   [N]              each sample's index in the run (0 .. n-1)
    keep         uint8   [N]              1 = survives the filter (only with --keep-all)
    ws           float32 [N, num_ws, w_dim]                                 (optional)

Shard files are byte-reproducible: datasets carry no timestamps (``track_times=False``),
links keep creation order (``track_order=True``), the HDF5 file-format versions are pinned
(`LIBVER`) and every attribute is a deterministic function of the samples and settings.

`write_shard` writes a shard atomically (temporary name, renamed when complete);
`read_manifest` / `write_manifest` handle the manifest (rewritten atomically, keys sorted,
no timestamps, so an interrupted-and-resumed run leaves the same bytes as an uninterrupted
one); `ShardDataset` reads a corpus as a ``torch.utils.data.Dataset``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from handsoff.errors import HandsoffError
from handsoff.utils.io import atomic_path, atomic_write_bytes

__all__ = ["SHARD_FORMAT", "CORPUS_FORMAT", "MANIFEST_NAME", "LIBVER", "ShardRecords", "ShardEntry", "Manifest",
           "shard_name", "write_shard", "read_shard", "read_manifest", "write_manifest", "ShardDataset"]

PathLike = Union[str, "os.PathLike[str]"]

SHARD_FORMAT = "handsoff-shard"
CORPUS_FORMAT = "handsoff-corpus"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: HDF5 file-format bounds: pinned so that another HDF5 library version writes the same bytes.
LIBVER = ("v110", "v110")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.h5``."""
    return f"shard-{index:05d}.h5"


# ---------------------------------------------------------------------------------------------
# Samples in memory

@dataclass
class ShardRecords:
    """The samples of (part of) a shard, in memory, in the dtypes they are stored in.

    Attributes:
        images: uint8 ``[N, H, W, 3]``.
        seeds: int64 ``[N]``, the seed of each sample's latent.
        index: int64 ``[N]``, each sample's index in the run.
        uncertainty: float32 ``[N]``.
        scores: per-task float32 ``[N]`` scores.
        seg: uint8 ``[N, h, w]`` or None.
        depth: float16 ``[N, h, w]`` or None.
        keypoints: float32 ``[N, K, 3]`` (x, y, confidence) or None.
        keep: bool ``[N]`` (whether the filter keeps the sample) or None.
        ws: float32 ``[N, num_ws, w_dim]`` or None.
    """

    images: np.ndarray
    seeds: np.ndarray
    index: np.ndarray
    uncertainty: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    seg: Optional[np.ndarray] = None
    depth: Optional[np.ndarray] = None
    keypoints: Optional[np.ndarray] = None
    keep: Optional[np.ndarray] = None
    ws: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _arrays(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, rows: Union[np.ndarray, Sequence[int]]) -> "ShardRecords":
        """The samples at ``rows`` (integer positions or a boolean mask), in that order."""
        out = {name: (None if value is None else {k: v[rows] for k, v in value.items()} if isinstance(value, dict)
                      else value[rows]) for name, value in self._arrays().items()}
        return ShardRecords(**out)

    def put(self, rows: np.ndarray, other: "ShardRecords") -> None:
        """Overwrite the samples at positions ``rows`` with ``other``'s (in order), in place."""
        for name, value in self._arrays().items():
            if isinstance(value, dict):
                for k in value:
                    value[k][rows] = other.scores[k]
            elif value is not None:
                value[rows] = getattr(other, name)

    @staticmethod
    def concat(parts: Sequence["ShardRecords"]) -> "ShardRecords":
        """Join parts that hold the same fields along N."""
        if not parts:
            raise ValueError("ShardRecords.concat needs at least one part")
        first = parts[0]._arrays()
        out: dict[str, Any] = {}
        for name, value in first.items():
            if value is None:
                out[name] = None
            elif isinstance(value, dict):
                out[name] = {k: np.concatenate([p.scores[k] for p in parts]) for k in value}
            else:
                out[name] = np.concatenate([getattr(p, name) for p in parts])
        return ShardRecords(**out)


# ---------------------------------------------------------------------------------------------
# Shard files

def _fail(path: PathLike, problem: str) -> HandsoffError:
    return HandsoffError(f"{os.fspath(path)}: {problem}")


def _attr(value: Any) -> Any:
    """Attributes are strings and numbers; anything structured is stored as sorted JSON."""
    if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True)


def write_shard(path: PathLike, records: ShardRecords, attrs: Mapping[str, Any], *,
                classes: Sequence[str] = (), keypoint_names: Sequence[str] = ()) -> Path:
    """Write ``records`` as one shard file, atomically and byte-reproducibly.

    Args:
        path: the final file name (e.g. ``DIR/shard-00003.h5``); the file is written under a
            temporary name beside it and renamed when complete.
        records: the samples.
        attrs: root attributes (``format`` and ``version`` are added); non-scalar values
            are stored as JSON.
        classes: segmentation class names (stored on ``seg``).
        keypoint_names: keypoint names (stored on ``keypoints``).

    Returns:
        ``path`` as a Path. OSError (a full disk, a read-only folder) propagates unchanged
        and leaves no file behind.
    """
    import h5py

    final = Path(path)
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w", libver=LIBVER, track_order=True) as f:
            for key, value in {"format": SHARD_FORMAT, "version": FORMAT_VERSION, **attrs}.items():
                f.attrs[key] = _attr(value)

            def put(name: str, data: np.ndarray, group: Any = f) -> Any:
                return group.create_dataset(name, data=data, track_times=False)

            put("images", records.images)
            if records.seg is not None:
                put("seg", records.seg).attrs["classes"] = json.dumps(list(classes))
            if records.depth is not None:
                put("depth", records.depth.astype(np.float16))
            if records.keypoints is not None:
                put("keypoints", records.keypoints.astype(np.float32)).attrs["names"] = json.dumps(list(keypoint_names))
            put("uncertainty", records.uncertainty.astype(np.float32))
            scores = f.create_group("scores", track_order=True)
            for name in sorted(records.scores):
                put(name, records.scores[name].astype(np.float32), scores)
            put("seeds", records.seeds.astype(np.int64))
            put("index", records.index.astype(np.int64))
            if records.keep is not None:
                put("keep", records.keep.astype(np.uint8))
            if records.ws is not None:
                put("ws", records.ws.astype(np.float32))
    return final


def _open_shard(path: PathLike) -> Any:
    import h5py

    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise _fail(path, f"not a readable HDF5 shard ({' '.join(str(err).split())})") from None
    if f.attrs.get("format") != SHARD_FORMAT:
        f.close()
        raise _fail(path, f"not a handsoff shard (format attribute {f.attrs.get('format')!r})")
    return f


def read_shard(path: PathLike) -> tuple[ShardRecords, dict[str, Any]]:
    """Read a whole shard: its samples (depth as float32) and its root attributes (JSON decoded)."""
    with _open_shard(path) as f:
        def opt(name: str) -> Optional[np.ndarray]:
            return f[name][()] if name in f else None

        depth = opt("depth")
        records = ShardRecords(
            images=f["images"][()], seeds=f["seeds"][()], index=f["index"][()], uncertainty=f["uncertainty"][()],
            scores={k: f["scores"][k][()] for k in f["scores"]}, seg=opt("seg"),
            depth=None if depth is None else depth.astype(np.float32), keypoints=opt("keypoints"),
            keep=None if "keep" not in f else f["keep"][()].astype(bool), ws=opt("ws"))
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
    return records, attrs


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------------------------
# The manifest

@dataclass(frozen=True)
class ShardEntry:
    """One finished shard as listed in the manifest.

    Attributes:
        file: file name inside the corpus folder.
        shard: shard number.
        indices: ``[start, stop)`` sample indices of the run that the shard covers.
        generated: samples generated for the shard (``stop - start``).
        kept: samples stored in it.
        sha256: hex digest of the file.
        size: file size in bytes.
        stats: deterministic per-shard figures (e.g. acceptance counts of ``--want-class``).
    """

    file: str
    shard: int
    indices: tuple[int, int]
    generated: int
    kept: int
    sha256: str
    size: int
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "shard": self.shard, "indices": list(self.indices), "generated": self.generated,
                "kept": self.kept, "sha256": self.sha256, "size": self.size, "stats": self.stats}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "ShardEntry":
        return ShardEntry(str(data["file"]), int(data["shard"]), (int(data["indices"][0]), int(data["indices"][1])),
                          int(data["generated"]), int(data["kept"]), str(data["sha256"]), int(data["size"]),
                          dict(data.get("stats", {})))


@dataclass(frozen=True)
class Manifest:
    """What a corpus is and which of its shards are finished.

    Attributes:
        identity: everything that determines the corpus bytes (settings, generator and
            labeler digests, ...); a resumed run must match it exactly.
        resolution: image size in pixels.
        classes: segmentation class names (empty without segmentation).
        keypoint_names: keypoint names (empty without keypoints).
        depth: whether samples carry depth.
        planned: number of shards the finished corpus has.
        shards: the finished shards, by shard number.
    """

    identity: dict[str, Any]
    resolution: int
    classes: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    depth: bool
    planned: int
    shards: tuple[ShardEntry, ...] = ()

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.planned

    @property
    def generated(self) -> int:
        return sum(e.generated for e in self.shards)

    @property
    def kept(self) -> int:
        return sum(e.kept for e in self.shards)

    def with_shard(self, entry: ShardEntry) -> "Manifest":
        """This manifest with ``entry`` added (replacing an entry for the same shard number)."""
        rest = [e for e in self.shards if e.shard != entry.shard]
        return replace(self, shards=tuple(sorted([*rest, entry], key=lambda e: e.shard)))

    def without_shards(self, numbers: set[int]) -> "Manifest":
        return replace(self, shards=tuple(e for e in self.shards if e.shard not in numbers))

    def to_json(self) -> dict[str, Any]:
        return {"format": CORPUS_FORMAT, "version": FORMAT_VERSION, "identity": self.identity,
                "resolution": self.resolution, "classes": list(self.classes),
                "keypoint_names": list(self.keypoint_names), "depth": self.depth, "planned_shards": self.planned,
                "complete": self.complete, "generated": self.generated, "kept": self.kept,
                "shards": [e.to_json() for e in self.shards]}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Manifest":
        return Manifest(dict(data["identity"]), int(data["resolution"]), tuple(data["classes"]),
                        tuple(data["keypoint_names"]), bool(data["depth"]), int(data["planned_shards"]),
                        tuple(ShardEntry.from_json(e) for e in data["shards"]))


def read_manifest(path: PathLike) -> Optional[Manifest]:
    """The manifest of the corpus folder (or manifest file) ``path``; None when there is none.

    Raises:
        HandsoffError: the file exists but is not a readable handsoff manifest.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        if data.get("format") != CORPUS_FORMAT:
            raise _fail(p, f"not a handsoff corpus manifest (format {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise _fail(p, f"corpus format version {data.get('version')!r} is not supported (want {FORMAT_VERSION})")
        return Manifest.from_json(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError,
            AttributeError) as err:
        raise _fail(p, f"unreadable manifest ({' '.join(str(err).split())})") from None


def write_manifest(path: PathLike, manifest: Manifest) -> Path:
    """Replace the manifest atomically; the bytes depend only on ``manifest`` (sorted keys)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    atomic_write_bytes(p, (json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n").encode())
    return p


# ---------------------------------------------------------------------------------------------
# Reading a corpus for training

class ShardDataset(Dataset):
    """A corpus folder as a map-style ``torch.utils.data.Dataset`` over the shards its manifest lists.

    ``dataset[i]`` is a dict of tensors::

        image        uint8   [3, H, W]
        seg          int64   [H, W]      (when the corpus has segmentation)
        depth        float32 [H, W]      (when it has depth)
        keypoints    float32 [K, 3]      x, y, confidence (when it has keypoints)
        uncertainty  float32 []          the filtering score
        seed         int64   []          the seed of the sample's latent

    Shard files are opened lazily, once per process, on first use: a ``DataLoader`` with
    ``num_workers > 0`` (fork or spawn) gives each worker its own HDF5 handles.

    Attributes:
        root: the corpus folder.
        manifest: its `Manifest`.
        classes: segmentation class names (empty tuple without segmentation).
        keypoint_names: keypoint names (empty tuple without keypoints).
        resolution: image size in pixels.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise _fail(self.root, f"no {MANIFEST_NAME} (not a generated corpus folder)")
        self.manifest = manifest
        self.classes = manifest.classes
        self.keypoint_names = manifest.keypoint_names
        self.resolution = manifest.resolution
        self._files = [self.root / e.file for e in manifest.shards]
        for path in self._files:
            if not path.is_file():
                raise _fail(path, f"listed in {MANIFEST_NAME} but missing")
        self._ends = np.cumsum([e.kept for e in manifest.shards], dtype=np.int64)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():  # forked into a worker: never share the parent's HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = _open_shard(self._files[shard])
        return self._handles[shard]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard position in the manifest, row in that shard) of sample ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a corpus of {n}")
        i %= n
        shard = int(np.searchsorted(self._ends, i, side="right"))
        return shard, i - (int(self._ends[shard - 1]) if shard else 0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, row = self.locate(int(i))
        f = self._handle(shard)
        item = {"image": torch.from_numpy(np.ascontiguousarray(f["images"][row].transpose(2, 0, 1)))}
        if "seg" in f:
            item["seg"] = torch.from_numpy(f["seg"][row].astype(np.int64))
        if "depth" in f:
            item["depth"] = torch.from_numpy(f["depth"][row].astype(np.float32))
        if "keypoints" in f:
            item["keypoints"] = torch.from_numpy(f["keypoints"][row].astype(np.float32))
        item["uncertainty"] = torch.tensor(float(f["uncertainty"][row]), dtype=torch.float32)
        item["seed"] = torch.tensor(int(f["seeds"][row]), dtype=torch.int64)
        return item

    def iter_shards(self) -> Iterator[ShardRecords]:
        """Every listed shard's samples, in manifest order (whole shards; for export and checks)."""
        for path in self._files:
            yield read_shard(path)[0]

    def close(self) -> None:
        """Close the HDF5 handles this process opened."""
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned DataLoader workers: handles never travel, each worker opens its own.
        return {**self.__dict__, "_handles": {}}

    def __del__(self) -> None:
        try:
            if getattr(self, "_pid", None) == os.getpid():
                self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass
