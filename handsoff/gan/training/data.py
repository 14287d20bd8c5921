"""Training images for the GAN: where they come from, how they are cached, in which order
they are shown, and how a batch reaches the device.

* `DataSource` names the images: a folder (``DIR/images/`` of a labeled set, or any
  folder of .png/.jpg), a built-in domain (a fixed set rendered once), or an array.
  Only images are used: labels are never shown to the GAN.
* `load_images` decodes/renders them once at the training resolution into a uint8
  ``[N, H, W, 3]`` array cached as ``.npy`` in the run directory, so a resumed run does
  not decode or render again.
* `DataOrder` is stateless: the batch of step ``s`` is a pure function of (seed, step),
  built from per-epoch permutations, so a resumed run sees exactly the same images in
  the same order as an uninterrupted one. With several processes each rank takes its
  slice of the global batch.
* `ImageStore` keeps the set as a uint8 tensor on the GPU when it fits (a batch is then
  one gather, with no host work and no synchronisation), otherwise in host memory, from
  where batches go through pinned memory with a one-step prefetch.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from handsoff.errors import HandsoffError
from handsoff.utils.io import atomic_path

__all__ = ["DataSource", "load_images", "cache_path", "render_domain", "RenderIncomplete", "DataOrder", "ImageStore",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CACHE_VERSION = 1


@dataclasses.dataclass
class DataSource:
    """Where the training images come from. Build with `folder`, `domain` or `array`."""

    kind: str
    path: Optional[Path] = None
    domain: Optional[str] = None
    count: int = 0
    seed: int = 0
    array: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    @classmethod
    def folder(cls, path: Union[str, os.PathLike]) -> "DataSource":
        """``path/images/`` when it exists (a labeled set), else every image under ``path``."""
        return cls(kind="folder", path=Path(path))

    @classmethod
    def from_domain(cls, name: str, count: int = 50000, seed: int = 0) -> "DataSource":
        """``count`` images of a built-in domain, rendered once with ``seed`` (indices 0..count-1)."""
        if count <= 0:
            raise HandsoffError(f"--domain-images must be positive, got {count}")
        return cls(kind="domain", domain=name, count=int(count), seed=int(seed))

    @classmethod
    def from_array(cls, images: np.ndarray) -> "DataSource":
        """In-memory uint8 images ``[N, H, W, 3]`` (already at the training resolution or not)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        return cls(kind="array", array=images, count=len(images))

    @classmethod
    def coerce(cls, data: Any) -> "DataSource":
        """Accept a `DataSource`, a folder path, ``"domain:NAME"`` or a uint8 array."""
        if isinstance(data, DataSource):
            return data
        if isinstance(data, np.ndarray):
            return cls.from_array(data)
        if isinstance(data, str) and data.startswith("domain:"):
            return cls.from_domain(data.split(":", 1)[1])
        if isinstance(data, (str, os.PathLike)):
            return cls.folder(data)
        raise TypeError(f"cannot use {type(data).__name__} as GAN training data")

    def describe(self) -> Dict[str, Any]:
        """JSON description stored in the run's config.json."""
        if self.kind == "folder":
            return {"kind": "folder", "path": str(Path(self.path).resolve())}
        if self.kind == "domain":
            return {"kind": "domain", "domain": self.domain, "count": self.count, "seed": self.seed}
        return {"kind": "array", "count": int(self.count),
                "sha256": hashlib.sha256(np.ascontiguousarray(self.array).tobytes()).hexdigest()}

    def same_as(self, stored: Dict[str, Any]) -> bool:
        mine = self.describe()
        if mine["kind"] != stored.get("kind"):
            return False
        if mine["kind"] == "folder":
            return True  # a folder may move between machines; its content is checked by the cache key
        return mine == stored


# --------------------------------------------------------------------------- folder loading
def _list_images(root: Path) -> List[Path]:
    folder = root / "images" if (root / "images").is_dir() else root
    if not folder.is_dir():
        raise HandsoffError(f"{root}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise HandsoffError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def _load_one(path: Path, resolution: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            if w != h:  # centre crop to a square
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            if s != resolution:
                im = im.resize((resolution, resolution), Image.LANCZOS if s > resolution else Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise HandsoffError(f"{path}: cannot read image ({err})") from err


def _resize_array(images: np.ndarray, resolution: int) -> np.ndarray:
    if images.shape[1] == resolution and images.shape[2] == resolution:
        return np.ascontiguousarray(images)
    from PIL import Image

    out = np.empty((len(images), resolution, resolution, 3), np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        im = Image.fromarray(img).resize((resolution, resolution), Image.LANCZOS if s > resolution else Image.BICUBIC)
        out[i] = np.asarray(im)
    return out


# --------------------------------------------------------------------------- domain rendering
def _render_chunk(name: str, start: int, count: int, seed: int, size: int, with_seg: bool = False):
    from handsoff.domains import get_domain

    batch = get_domain(name).render(count, seed, size, start=start)
    images = np.asarray(batch.images)
    if images.dtype != np.uint8 or images.shape != (count, size, size, 3):
        raise RuntimeError(f"domain {name!r} rendered {images.dtype} {images.shape}, "
                           f"expected uint8 {(count, size, size, 3)}")
    return (images, np.asarray(batch.seg)) if with_seg else images


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core; the renderer is vectorised torch on the CPU


class RenderIncomplete(HandsoffError):
    """Rendering stopped at its deadline; finished chunks are kept and a rerun goes on from them."""

    def __init__(self, done: int, total: int):
        super().__init__(f"rendered {done} of {total} training images before the time limit; "
                         "rerun the same command to continue (finished chunks are kept)")
        self.done = done
        self.total = total


def render_domain(name: str, count: int, seed: int, size: int, workers: int = 1, progress: bool = False,
                  with_seg: bool = False, chunk: int = 128, desc: Optional[str] = None,
                  chunk_dir: Optional[Path] = None, deadline: Optional[float] = None):
    """Images ``0 .. count-1`` of a built-in domain (uint8 ``[N, size, size, 3]``; with ``with_seg``
    also the uint8 ``[N, size, size]`` segmentation), rendered in chunks by ``workers`` processes.

    With ``chunk_dir`` every finished chunk is saved there and reused by a later call, so an
    interrupted render continues where it stopped. Past ``deadline`` (a `time.time()` value)
    no new chunk is started and `RenderIncomplete` is raised once the running ones finish.
    """
    import time

    from tqdm.auto import tqdm

    try:
        from handsoff.domains import get_domain
        get_domain(name)
    except ImportError as err:
        raise HandsoffError(f"domain {name}: the built-in domains are not available ({err})") from err
    except (KeyError, ValueError) as err:
        raise HandsoffError(f"--domain {name}: {err}") from err
    out = np.empty((count, size, size, 3), np.uint8)
    seg = np.empty((count, size, size), np.uint8) if with_seg else None
    starts = list(range(0, count, chunk))
    bar = tqdm(total=count, desc=desc or f"rendering {name}", unit="img", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    done = 0

    def chunk_path(s: int) -> Path:
        return Path(chunk_dir) / f"chunk-{s:08d}.npz"

    def put(s: int, result, save: bool) -> None:
        nonlocal done
        imgs = result[0] if with_seg else result
        out[s:s + len(imgs)] = imgs
        if with_seg:
            seg[s:s + len(imgs)] = result[1]
        if save and chunk_dir is not None:
            with atomic_path(chunk_path(s)) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, images=imgs, **({"seg": result[1]} if with_seg else {}))
        done += len(imgs)
        bar.update(len(imgs))

    todo = []
    for s in starts:
        if chunk_dir is not None and chunk_path(s).is_file():
            try:
                with np.load(chunk_path(s)) as z:
                    put(s, (z["images"], z["seg"]) if with_seg else z["images"], save=False)
                continue
            except (OSError, ValueError, KeyError):
                chunk_path(s).unlink(missing_ok=True)
        todo.append(s)

    def late() -> bool:
        return deadline is not None and time.time() >= deadline

    try:
        workers = min(workers, len(todo))
        if workers <= 1:
            for s in todo:
                if late():
                    raise RenderIncomplete(done, count)
                put(s, _render_chunk(name, s, min(chunk, count - s), seed, size, with_seg), save=True)
        elif todo:
            ctx = multiprocessing.get_context("spawn")  # no fork after threads / CUDA
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
                pending: Dict[cf.Future, int] = {}
                queue = list(todo)
                while queue or pending:
                    while queue and len(pending) < 2 * workers and not late():
                        s = queue.pop(0)
                        fut = pool.submit(_render_chunk, name, s, min(chunk, count - s), seed, size, with_seg)
                        pending[fut] = s
                    if not pending:
                        break
                    finished, _ = cf.wait(list(pending), timeout=5.0, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        put(pending.pop(fut), fut.result(), save=True)
                if queue:
                    raise RenderIncomplete(done, count)
    finally:
        bar.close()
    if chunk_dir is not None:
        for s in starts:
            chunk_path(s).unlink(missing_ok=True)
        try:
            Path(chunk_dir).rmdir()
        except OSError:
            pass
    return (out, seg) if with_seg else out


# --------------------------------------------------------------------------- cache
def _cache_key(source: DataSource, resolution: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{_CACHE_VERSION}-{resolution}-".encode())
    if source.kind == "folder":
        files = _list_images(Path(source.path))
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(source.path)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    else:
        h.update(json.dumps(source.describe(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def cache_path(source: DataSource, resolution: int, cache_dir: Path) -> Path:
    """Where `load_images` keeps the decoded/rendered set of ``source``."""
    name = source.domain if source.kind == "domain" else "folder"
    return Path(cache_dir) / f"data-{name}-{resolution}-{_cache_key(source, resolution)}.npy"


def load_images(source: DataSource, resolution: int, cache_dir: Optional[Path] = None, workers: int = 4,
                progress: bool = True, deadline: Optional[float] = None) -> np.ndarray:
    """The training set as uint8 ``[N, resolution, resolution, 3]``.

    With ``cache_dir`` the decoded/rendered array is written there once
    (``data-<kind>-<res>-<key>.npy``) and memory-mapped on later calls; a domain render
    stopped by ``deadline`` (`RenderIncomplete`) continues from its finished chunks.
    """
    if source.kind == "array":
        return _resize_array(source.array, resolution)
    path = None
    if cache_dir is not None:
        path = cache_path(source, resolution, cache_dir)
        if path.exists():
            try:
                return np.load(path, mmap_mode="r")
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # a damaged cache: rebuild it
    if source.kind == "domain":
        images = render_domain(source.domain, source.count, source.seed, resolution, workers=workers,
                               progress=progress, deadline=deadline,
                               chunk_dir=path.with_suffix(".parts") if path is not None else None)
    elif source.kind == "folder":
        files = _list_images(Path(source.path))
        images = np.empty((len(files), resolution, resolution, 3), np.uint8)
        from tqdm.auto import tqdm

        with cf.ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            it = pool.map(lambda f: _load_one(f, resolution), files)
            for i, img in enumerate(tqdm(it, total=len(files), desc="loading images", unit="img",
                                         disable=not progress, mininterval=1.0, dynamic_ncols=True)):
                images[i] = img
    else:
        raise ValueError(f"unknown data source kind {source.kind!r}")
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, images)
    return images


# --------------------------------------------------------------------------- order
class DataOrder:
    """Deterministic order: global sample ``k`` is ``perm(k // n)[k % n]``, where ``perm(e)``
    is a permutation drawn from ``np.random.default_rng([seed, e])``. Step ``s`` of a run
    with global batch ``B`` uses samples ``s*B .. s*B + B - 1``; rank ``r`` of ``W`` takes
    the ``r``-th of W equal slices."""

    def __init__(self, num_images: int, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if num_images <= 0:
            raise HandsoffError("the training set is empty")
        if global_batch % world_size:
            raise HandsoffError(f"batch {global_batch} is not divisible by the {world_size} processes")
        self.n = num_images
        self.seed = seed
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.local_batch = global_batch // world_size
        self._perms: Dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = p
        return p

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this rank's part of the batch of ``step``."""
        start = step * self.global_batch + self.rank * self.local_batch
        k = np.arange(start, start + self.local_batch, dtype=np.int64)
        epochs = k // self.n
        out = np.empty_like(k)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.perm(int(e))[k[sel] % self.n]
        return out

    def state(self, step: int) -> Dict[str, int]:
        return {"seed": self.seed, "num_images": self.n, "global_batch": self.global_batch,
                "next_sample": step * self.global_batch, "epoch": (step * self.global_batch) // self.n}


# --------------------------------------------------------------------------- store
class ImageStore:
    """Holds the uint8 training set and turns index arrays into float batches on ``device``.

    The set lives on the GPU as ``[N, 3, H, W]`` uint8 when it is smaller than
    ``device_budget`` bytes (default: a quarter of the free GPU memory, at most 16 GiB);
    otherwise on the host, where batches are gathered, pinned and copied asynchronously.
    """

    def __init__(self, images: np.ndarray, device: torch.device, device_budget: Optional[int] = None):
        self.device = torch.device(device)
        self.num_images, h, w, c = images.shape
        self.resolution = h
        self.on_device = False
        nbytes = int(np.prod(images.shape))
        if self.device.type == "cuda":
            if device_budget is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                device_budget = min(free // 4, 16 << 30)
            if nbytes <= device_budget:
                self.on_device = True
        if self.on_device:
            data = torch.empty((self.num_images, c, h, w), dtype=torch.uint8, device=self.device)
            step = max(1, (256 << 20) // max(h * w * c, 1))
            for s in range(0, self.num_images, step):
                chunk = torch.from_numpy(np.ascontiguousarray(images[s:s + step]))
                data[s:s + len(chunk)] = chunk.to(self.device).permute(0, 3, 1, 2)
            self.data = data
            self.host = None
        else:
            self.data = None
            self.host = images  # NHWC uint8 (maybe a memmap)
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._pending: Dict[int, cf.Future] = {}

    @property
    def nbytes(self) -> int:
        return int(self.num_images * self.resolution * self.resolution * 3)

    def _host_batch(self, idx: np.ndarray) -> torch.Tensor:
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to a memmap
        gathered = np.empty((len(idx),) + self.host.shape[1:], np.uint8)
        gathered[order] = self.host[idx[order]]
        t = torch.from_numpy(gathered).permute(0, 3, 1, 2).contiguous()
        return t.pin_memory() if self.device.type == "cuda" else t

    def uint8_batch(self, idx: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` on the device for dataset indices ``idx``."""
        if self.on_device:
            it = torch.from_numpy(idx).pin_memory().to(self.device, non_blocking=True)
            return self.data.index_select(0, it)
        return self._host_batch(idx).to(self.device, non_blocking=True)

    def batch(self, idx: np.ndarray, step: Optional[int] = None, next_idx: Optional[np.ndarray] = None
              ) -> torch.Tensor:
        """float32 ``[B, 3, H, W]`` in [-1, 1] on the device. On the host path ``next_idx``
        (the indices of step+1) is gathered in a background thread while this step trains."""
        if self.on_device or step is None:
            u8 = self.uint8_batch(idx)
        else:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=1)
            fut = self._pending.pop(step, None)
            t = fut.result() if fut is not None else self._host_batch(idx)
            self._pending = {}
            if next_idx is not None:
                self._pending[step + 1] = self._pool.submit(self._host_batch, next_idx)
            u8 = t.to(self.device, non_blocking=True)
        return u8.to(torch.float32).div_(127.5).sub_(1.0)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending = {}


def describe_size(nbytes: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(max(nbytes, 1), 1024)), len(units) - 1)
    return f"{nbytes / 1024 ** i:.1f} {units[i]}"


def sample_reals(images: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` training images (without replacement when possible), for grids and metrics."""
    rng = np.random.default_rng([seed, 0x5EED])
    n = len(images)
    idx = rng.permutation(n)[:count] if count <= n else rng.integers(0, n, size=count)
    return np.asarray(images[np.sort(idx)] if count <= n else images[idx])


