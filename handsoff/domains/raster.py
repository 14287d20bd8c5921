"""Batched analytic ray casting under an orthographic camera, in plain torch ops on the CPU.

Camera space: ``x`` to the right, ``y`` up, ``z`` away from the camera (so ``z`` is the
depth). The frame spans ``x, y`` in ``[-1, 1]``; the ray through a sample at ``(u, v)`` is
``{(u, v, t)}``, so the first surface hit is the smallest ``t``.

Everything per image (centres, axes, colours) is a small float64 numpy array of length N;
everything per sample is a float32 tensor ``[N, H, W]``. Quantities that depend on the
sample column only (or the row only) are kept as ``[N, 1, W]`` / ``[N, H, 1]`` and broadcast.

Two rules keep this fast and reproducible on a CPU:

* Masks are float margins, not booleans: a shape is "where ``margin > 0``" and
  `step` turns a margin into an exact 0/1 with one multiply and one clamp. On the CPU,
  comparisons, ``where`` and ``masked_fill`` cost 4 to 20 times an arithmetic op, and
  ``sqrt`` of a negative number (NaN) about 30 times (of zero, 5 times); misses are a
  finite `MISS` depth.
* Only elementwise arithmetic, ``sqrt``, ``floor``, min/max and gathers per sample: they
  give the same bits whether an element lands in a vectorised loop or its scalar tail, so a
  render does not change with the batch size or the thread count (no ``sin``/``exp``/``pow``,
  whose SIMD and scalar versions can differ in the last bit, and no fused ``addcmul``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["FAR_DEPTH", "MISS", "ClipFn", "Grid", "Region", "points_box", "union_box", "Linear", "Ellipsoid",
           "ZBuffer", "per_image", "step", "penalty", "no_hits", "ellipsoid_depth", "clipped_ellipsoid_depth", "tri",
           "TileSampler", "pool_2x2", "majority_2x2"]

#: Depth of the background: every scene surface lies well in front of it (heads sit at z ~ 5).
FAR_DEPTH = 10.0
#: Depth of a miss: behind the background, and finite (see the module docstring).
MISS = 1.0e4
#: Multiplier that saturates any margin a render can produce (|margin| > 1e-30) to 0 or 1.
_SATURATE = 1.0e30


def per_image(values: np.ndarray | float) -> Tensor:
    """Per-image numbers ``[N]`` -> float32 tensor ``[N, 1, 1]`` that broadcasts over samples."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(-1, 1, 1)


def step(margin: Tensor, high: float = 1.0) -> Tensor:
    """``high`` where ``margin > 0``, else 0 (a new tensor, same shape)."""
    return (margin * _SATURATE).clamp_(0.0, high)


def penalty(margin: Tensor) -> Tensor:
    """`MISS` where ``margin < 0``, else 0: ``torch.maximum(depth, penalty(m))`` removes hits."""
    return (margin * -_SATURATE).clamp_(0.0, MISS)


@dataclass(frozen=True)
class Grid:
    """Sample centres in frame units: a full square ``res x res`` grid, or a part of it.

    ``u``: column centres, left to right; ``v``: row centres, top to bottom (``+1 .. -1``);
    float64 numpy ``[W]`` / ``[H]`` shared by all images, or ``[N, W]`` / ``[N, H]`` per
    image (crops at per-image offsets, see `Region`). On the full grid sample ``(i, j)`` is
    centred at ``u = -1 + (j + 0.5) * 2 / res``, ``v = -(same for i)``, so the centre of a
    2x2 block of a ``2 * res`` grid is the centre of a ``res`` pixel.
    """

    res: int
    u: np.ndarray
    v: np.ndarray

    @staticmethod
    def square(res: int) -> "Grid":
        centres = -1.0 + (np.arange(res) + 0.5) * (2.0 / res)
        return Grid(res, centres, -centres)

    @property
    def shape(self) -> tuple[int, int]:
        return self.v.shape[-1], self.u.shape[-1]

    def row(self, values: np.ndarray) -> Tensor:
        """Per-column values ``[N, W]`` (float64 numpy) -> float32 ``[N, 1, W]``."""
        return torch.from_numpy(values.astype(np.float32)).view(-1, 1, self.shape[1])

    def col(self, values: np.ndarray) -> Tensor:
        """Per-row values ``[N, H]`` (float64 numpy) -> float32 ``[N, H, 1]``."""
        return torch.from_numpy(values.astype(np.float32)).view(-1, self.shape[0], 1)

    def affine(self, au: np.ndarray, av: np.ndarray, a0: np.ndarray) -> Tensor:
        """``au*u + av*v + a0`` per image (``[N]`` each) on the grid: ``[N, H, W]``."""
        return self.row(au[:, None] * self.u + a0[:, None]) + self.col(av[:, None] * self.v)


class Region:
    """Where a part of the scene is evaluated: a window shared by a block, or per-image crops.

    Most parts cover a small area of every image, at places that differ from image to image.
    A shared window (one slice of the full grid) costs nothing to cut out; per-image crops of
    one common size (gathered by index) cost two index operations but can be much smaller.
    `Region.of` picks the cheaper. ``grid`` holds the sample coordinates of the region.
    """

    def __init__(self, grid: Grid, window: tuple[slice, slice] | None, index: Tensor | None, n: int) -> None:
        self.grid, self._window, self._index, self._n = grid, window, index, n

    @staticmethod
    def of(full: Grid, box: np.ndarray) -> "Region | None":
        """The region of ``full`` that holds per-image boxes ``[N, 4]`` (x0, x1, y0, y1), or None.

        NaN rows are ignored (absent parts); boxes get a one-sample margin.
        """
        n, res, half = len(box), full.res, 0.5 * full.res
        present = ~np.isnan(box).any(axis=1)
        if not present.any():
            return None
        safe = np.where(present[:, None], box, 0.0)
        c0 = np.clip(np.floor((safe[:, 0] + 1.0) * half - 0.5).astype(np.int64) - 1, 0, res)
        c1 = np.clip(np.ceil((safe[:, 1] + 1.0) * half - 0.5).astype(np.int64) + 2, 0, res)
        r0 = np.clip(np.floor((1.0 - safe[:, 3]) * half - 0.5).astype(np.int64) - 1, 0, res)
        r1 = np.clip(np.ceil((1.0 - safe[:, 2]) * half - 0.5).astype(np.int64) + 2, 0, res)
        c0, c1, r0, r1 = (np.where(present, x, d) for x, d in ((c0, res), (c1, 0), (r0, res), (r1, 0)))
        h, w = int((r1 - r0).max()), int((c1 - c0).max())
        if h <= 0 or w <= 0:
            return None
        rows, cols = slice(int(r0.min()), int(r1.max())), slice(int(c0.min()), int(c1.max()))
        union = (rows.stop - rows.start) * (cols.stop - cols.start)
        # Crops pay for a gather and a scatter (each costs about five arithmetic operations per
        # sample): worth it when they are clearly smaller than the window.
        if h * w > 0.6 * union:
            return Region(Grid(res, full.u[cols], full.v[rows]), (rows, cols), None, n)
        r0, c0 = np.minimum(np.where(present, r0, 0), res - h), np.minimum(np.where(present, c0, 0), res - w)
        rr, cc = r0[:, None] + np.arange(h), c0[:, None] + np.arange(w)
        index = (np.arange(n)[:, None, None] * res + rr[:, :, None]) * res + cc[:, None, :]
        return Region(Grid(res, full.u[cc], full.v[rr]), None, torch.from_numpy(index.reshape(-1)), n)

    def take(self, full: Tensor) -> Tensor:
        """The region's part of a full-grid tensor ``[N, res, res]``: ``[N, h, w]``.

        A view for a window (writes go through), a copy for crops (write back with `put`).
        """
        if self._window is not None:
            return full[:, self._window[0], self._window[1]]
        assert self._index is not None
        return full.reshape(-1).index_select(0, self._index).view(self._n, *self.grid.shape)

    def put(self, full: Tensor, values: Tensor) -> None:
        """Write ``values [N, h, w]`` into the region of ``full`` (in place)."""
        if self._window is not None:
            part = full[:, self._window[0], self._window[1]]
            if values.data_ptr() != part.data_ptr():  # a view of `full` was changed in place
                part.copy_(values)
        else:  # scatter_ is several times faster than index_copy_ on the CPU
            full.view(-1).scatter_(0, self._index, values.reshape(-1))

    def minimum_into(self, full: Tensor, values: Tensor) -> None:
        """``full = min(full, values)`` over the region (in place)."""
        if self._window is not None:
            part = self.take(full)
            torch.minimum(part, values, out=part)
        else:
            full.view(-1).scatter_reduce_(0, self._index, values.reshape(-1), "amin")


def union_box(*boxes: np.ndarray) -> np.ndarray:
    """Per-image union ``[N, 4]`` of boxes ``[N, 4]`` (x0, x1, y0, y1); NaN rows count as empty."""
    stacked = np.stack(boxes)
    with np.errstate(all="ignore"):
        lo, hi = np.fmin.reduce(stacked, axis=0), np.fmax.reduce(stacked, axis=0)
    return np.stack([lo[:, 0], hi[:, 1], lo[:, 2], hi[:, 3]], -1)


def points_box(points: np.ndarray) -> np.ndarray:
    """Screen boxes ``[N, 4]`` (x0, x1, y0, y1) of camera points ``[N, K, 3]``."""
    return np.stack([points[..., 0].min(1), points[..., 0].max(1), points[..., 1].min(1), points[..., 1].max(1)], -1)


@dataclass(frozen=True)
class Linear:
    """A per-image affine field ``f(u, v, t) = au*u + av*v + at*t + a0`` (numpy ``[N]`` each)."""

    au: np.ndarray
    av: np.ndarray
    at: np.ndarray
    a0: np.ndarray

    def affine(self, scale: np.ndarray | float, shift: np.ndarray | float = 0.0) -> "Linear":
        """The field ``(f - shift) / scale``."""
        inv = 1.0 / np.asarray(scale, dtype=np.float64)
        return Linear(self.au * inv, self.av * inv, self.at * inv, (self.a0 - shift) * inv)

    def at_depth(self, grid: Grid, t: Tensor | None = None) -> Tensor:
        """Evaluate on the grid, at depth ``t`` ``[N, H, W]`` (or where ``at = 0``): ``[N, H, W]``."""
        out = grid.affine(self.au, self.av, self.a0)
        if t is not None:
            out += per_image(self.at) * t
        return out

    def solve_t(self, value: np.ndarray) -> "Linear":
        """The depth where the field equals ``value``: ``t(u, v)`` as a field with ``at = 0``.

        Callers make sure ``at`` is away from 0 (a plane not seen edge-on).
        """
        inv = -1.0 / self.at
        return Linear(self.au * inv, self.av * inv, np.zeros_like(self.at), (self.a0 - value) * inv)

    def substitute_t(self, t: "Linear") -> "Linear":
        """This field evaluated at a depth that is itself a field ``t(u, v)``."""
        return Linear(self.au + self.at * t.au, self.av + self.at * t.av, np.zeros_like(self.at),
                      self.a0 + self.at * t.a0)


@dataclass(frozen=True)
class Ellipsoid:
    """One ellipsoid per image, in camera space.

    Attributes:
        centre: ``[N, 3]``.
        axes: ``[N, 3, 3]``; column ``k`` is the unit direction of semi-axis ``k``.
        radii: ``[N, 3]`` semi-axis lengths.
        enabled: ``[N]`` bool; a disabled ellipsoid is never hit.
    """

    centre: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    enabled: np.ndarray

    def quadric(self) -> np.ndarray:
        """``Q [N, 3, 3]`` with ``(p - centre)^T Q (p - centre) = 1`` on the surface."""
        scaled = self.axes / self.radii[:, None, :] ** 2
        return np.einsum("nik,njk->nij", scaled, self.axes)

    def screen_box(self) -> np.ndarray:
        """Screen boxes ``[N, 4]`` (x0, x1, y0, y1) of the silhouettes; NaN rows where disabled.

        The half extent along a screen axis ``e`` is ``sqrt(e^T Q^-1 e)``.
        """
        spread = np.einsum("nik,nk,njk->nij", self.axes, self.radii**2, self.axes)
        hx, hy = np.sqrt(spread[:, 0, 0]), np.sqrt(spread[:, 1, 1])
        box = np.stack([self.centre[:, 0] - hx, self.centre[:, 0] + hx,
                        self.centre[:, 1] - hy, self.centre[:, 1] + hy], -1)
        return np.where(self.enabled[:, None], box, np.nan)


def no_hits(n: int, grid: Grid) -> Tensor:
    """``[N, H, W]`` of `MISS` over the grid (or window)."""
    return torch.full((n, *grid.shape), MISS)


def _disable(t: Tensor, enabled: np.ndarray) -> Tensor:
    """Push the depth of images whose primitive is disabled to `MISS` (in place)."""
    if not enabled.all():
        t += per_image(np.where(enabled, 0.0, MISS))
    return t


def ellipsoid_depth(grid: Grid, e: Ellipsoid, back: bool = False) -> tuple[Tensor, Tensor | None]:
    """Depth of the front (and, if asked, back) intersection: ``[N, H, W]``, >= `MISS` on a miss.

    With ``s = t - centre_z`` the ray meets the quadric where
    ``Qzz s^2 + 2 s (Qxz du + Qyz dv) + (Qxx du^2 + 2 Qxy du dv + Qyy dv^2 - 1) = 0``;
    its discriminant divided by ``Qzz^2`` is a quadratic form in ``(du, dv)`` whose only
    non-separable term is ``du * dv``; the ray misses where it is negative.
    """
    n = len(e.enabled)
    if not e.enabled.any():  # why: optional parts (hats, glasses) are absent from most blocks
        return no_hits(n, grid), (no_hits(n, grid) if back else None)
    q = e.quadric()
    qxx, qyy, qzz = q[:, 0, 0], q[:, 1, 1], q[:, 2, 2]
    qxy, qxz, qyz = q[:, 0, 1], q[:, 0, 2], q[:, 1, 2]
    inv2 = (1.0 / qzz**2)[:, None]
    du = np.atleast_2d(grid.u) - e.centre[:, 0:1]  # [N, W]
    dv = np.atleast_2d(grid.v) - e.centre[:, 1:2]  # [N, H]
    root = grid.row(2.0 * (qxz * qyz - qzz * qxy)[:, None] * inv2 * du) * grid.col(dv)
    root += grid.row((qxz**2 - qzz * qxx)[:, None] * inv2 * du * du + (1.0 / qzz)[:, None])
    root += grid.col((qyz**2 - qzz * qyy)[:, None] * inv2 * dv * dv)
    miss = penalty(root)
    root.clamp_(min=1e-20).sqrt_()  # not 0: sqrt(0) takes the CPU's slow path, ~5x slower
    middle = grid.row(e.centre[:, 2:3] - (qxz / qzz)[:, None] * du) + grid.col(-(qyz / qzz)[:, None] * dv)
    front = _disable(torch.maximum(middle - root, miss), e.enabled)
    if not back:
        return front, None
    rear = torch.maximum(middle.add_(root), miss)
    return front, _disable(rear, e.enabled)


#: A clip test: unit-sphere coordinates ``(qx, qy, qz)`` of hit points -> margin (> 0: keep).
ClipFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def clipped_ellipsoid_depth(grid: Grid, e: Ellipsoid, unit_coords: tuple[Linear, Linear, Linear],
                            keep: ClipFn) -> Tensor:
    """First hit of an ellipsoid of which only the part of the surface where ``keep > 0`` exists.

    ``unit_coords`` map a camera point to the ellipsoid's unit-sphere coordinates. Only the
    front hit is tested: where it is cut away the ray passes on to whatever lies behind. (The
    inside of the far side would be visible there too, but for hair and hats that is behind
    the head; skipping it halves the cost.) ``[N, H, W]``.
    """
    front, _ = ellipsoid_depth(grid, e)
    if not e.enabled.any():
        return front
    # Where front >= MISS the coordinates are meaningless, but the depth stays a miss anyway.
    return torch.maximum(front, penalty(keep(*(c.at_depth(grid, front) for c in unit_coords))))


class ZBuffer:
    """Running nearest hit, with the primitive id packed into the low mantissa bits.

    Positive floats order like their int32 bit patterns, so with the id in the 5 lowest bits
    one ``minimum`` per primitive keeps both the nearest depth and its id (the depth loses
    those bits: about 2e-6 relative, 1e-5 at depth 5). Ids 0..31.
    """

    ID_BITS = 5

    def __init__(self, n: int, res: int, background: int) -> None:
        self._key = self._pack(torch.full((n, res, res), FAR_DEPTH), background)

    @classmethod
    def _pack(cls, depth: Tensor, pid: int) -> Tensor:
        bits = depth.view(torch.int32)
        bits &= -(1 << cls.ID_BITS)
        bits |= pid
        return bits

    def add(self, depth: Tensor, pid: int, region: Region) -> None:
        """Offer the depths ``[N, h, w]`` (positive; consumed) of primitive ``pid`` on ``region``."""
        region.minimum_into(self._key, self._pack(depth, pid))

    def result(self) -> tuple[Tensor, Tensor]:
        """Depth ``[N, H, W]`` float32 (the background exactly `FAR_DEPTH`) and id int32."""
        pid = self._key & ((1 << self.ID_BITS) - 1)
        depth = (self._key & -(1 << self.ID_BITS)).view(torch.float32)
        return depth, pid


def tri(x: Tensor) -> Tensor:
    """Triangle wave with period 1: 0 at integers, 1 at half-integers. ``[...]`` -> ``[...]``."""
    frac = x - torch.floor(x)
    return 1.0 - (frac - 0.5).abs_().mul_(2.0)


class TileSampler:
    """Looks up a fixed periodic ``T x T`` texture at per-image scale and offset (nearest texel)."""

    def __init__(self, tile: Tensor) -> None:
        if tile.ndim != 2 or tile.shape[0] != tile.shape[1]:
            raise ValueError(f"tile must be square [T, T], got {tuple(tile.shape)}")
        self.size = tile.shape[0]
        self.flat = tile.contiguous().view(-1)

    def sample(self, grid: Grid, texels_per_frame: np.ndarray, offset: np.ndarray) -> Tensor:
        """``[N, H, W]`` texture values; ``texels_per_frame`` ``[N]``, ``offset`` ``[N, 2]`` in texels."""
        size = self.size
        half = 0.5 * texels_per_frame[:, None]
        cols = np.floor((grid.u + 1.0) * half + offset[:, 0:1]).astype(np.int64) % size
        rows = np.floor((1.0 - grid.v) * half + offset[:, 1:2]).astype(np.int64) % size * size
        index = torch.from_numpy(rows.astype(np.int32)).view(-1, len(grid.v), 1) \
            + torch.from_numpy(cols.astype(np.int32)).view(-1, 1, len(grid.u))
        return self.flat.index_select(0, index.view(-1)).view(-1, *grid.shape)


def _quads(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four samples of each 2x2 block of ``[..., 2H, 2W]``: four ``[..., H, W]`` views."""
    *lead, h2, w2 = x.shape
    blocks = x.view(*lead, h2 // 2, 2, w2 // 2, 2)
    return blocks[..., 0, :, 0], blocks[..., 0, :, 1], blocks[..., 1, :, 0], blocks[..., 1, :, 1]


def pool_2x2(x: Tensor) -> Tensor:
    """Mean over 2x2 blocks, ``[..., 2H, 2W] -> [..., H, W]`` (cheaper than avg_pool2d on CPU)."""
    *lead, h2, w2 = x.shape
    pairs = x.view(*lead, h2, w2 // 2, 2)
    cols = pairs[..., 0] + pairs[..., 1]
    rows = cols.view(*lead, h2 // 2, 2, w2 // 2)
    return (rows[..., 0, :] + rows[..., 1, :]).mul_(0.25)


def majority_2x2(labels: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
    """Reduce a 2x supersampled label map to pixels by majority vote over each 2x2 block.

    Ties go to the nearest sample (foreground wins a 2-2 split), exact ties to the first
    sample. The depth is that of the chosen sample, so label and depth stay one surface.

    Args:
        labels: ``[N, 2H, 2W]`` integer class per sample (< 32).
        depth: ``[N, 2H, 2W]`` float depth in ``[0, FAR_DEPTH]``.

    Returns:
        ``labels [N, H, W]`` int32 and ``depth [N, H, W]`` float32.
    """
    lab = [x.int() for x in _quads(labels)]
    dep = _quads(depth)
    same = {(i, j): (lab[i] == lab[j]).int() for i in range(4) for j in range(i + 1, 4)}
    keys = []
    for i in range(4):
        votes = sum(same[min(i, j), max(i, j)] for j in range(4) if j != i)
        # Key, most significant first: votes (2 bits), nearness (21 bits), sample (2 bits).
        near = ((FAR_DEPTH - dep[i]) * ((1 << 21) - 1) / FAR_DEPTH).int()
        keys.append((votes << 23 | near) << 2 | (3 - i))
    best = torch.maximum(torch.maximum(keys[0], keys[1]), torch.maximum(keys[2], keys[3]))
    pick = (3 - (best & 3)).long().unsqueeze(0)
    return (torch.stack(lab).gather(0, pick)[0], torch.stack(list(dep)).gather(0, pick)[0])
