"""The built-in 'heads' domain: procedurally rendered heads with exact labels.

A head is a union of ellipsoids (skull, jaw, nose, ears), a clipped ellipsoid shell of hair
(plus a long-hair mass behind the neck), a neck and shoulders, and sometimes a hat, earrings
or glasses; eyes, brows and lips are decals painted on the skin in the head's own frame.
Each image has its own pose (yaw, pitch, roll), proportions, colours (skin tone, hair, eyes,
lipstick, clothes), textures (grain, strands, stripes, blotches) and light (direction,
ambient, specular), composited over a cluttered background whose colours sometimes copy the
skin or hair.

How a batch is made (all vectorised over the batch, torch on the CPU):

1. Ray casting at twice the output size under an orthographic camera (`raster`): the depth
   of every primitive is computed analytically, the first hit wins (z-buffer).
2. Decals replace the material of skin samples; materials and geometry are gathered per
   sample from small per-image tables (deferred shading: Lambert with wrap-around +
   Blinn-Phong specular, textures as multiplicative detail).
3. Antialiasing: the shaded foreground and its coverage are averaged over each 2x2 block
   (area downsampling) and composited over the background, which is drawn at the output
   size with one-pixel soft edges.
4. Labels come from the same 2x2 samples: ``seg`` is the majority class of the block (ties
   go to the nearest sample) and ``depth`` is that sample's depth, so a label and its depth
   always belong to one surface. Background depth is `FAR_DEPTH` (10.0); heads sit at a
   depth of about 5 in units where the frame spans [-1, 1].
5. Keypoints are 3-D anchors on the surfaces, projected; a keypoint is visible when it lies
   inside the frame and the rendered depth (the farthest of the 3x3 supersamples around it)
   is not in front of it by more than 3% of the head radius.

Determinism: image ``i`` of seed ``s`` depends only on ``(s, i, size)``. Images are rendered
in fixed blocks of `block_size` consecutive indices, whatever range was asked for, and the
per-sample arithmetic avoids operations whose result depends on vectorisation, so a range
gives the same bytes however it is split into calls (and with any thread count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from handsoff.domains.base import LabeledBatch
from handsoff.domains.heads_scene import (CLASSES, KEYPOINT_NAMES, MATERIAL_CLASS, N_MATS, N_PRIMS, Backdrop,
                                          Ch, HairClip, HeadScene, Mat, Prim, sample_scene)
from handsoff.domains.raster import (FAR_DEPTH, MISS, ClipFn, Grid, Linear, points_box, TileSampler, ZBuffer,
                                     clipped_ellipsoid_depth, ellipsoid_depth, majority_2x2, no_hits, penalty,
                                     per_image, pool_2x2, step, tri)

__all__ = ["HeadsDomain", "FAR_DEPTH", "block_size"]

#: Samples per block at the 2x render: about 512 KiB per float tensor keeps the working set in
#: cache and below the allocator's mmap threshold, which is several times faster on the CPU.
_BLOCK_SAMPLES = 1 << 17


def block_size(size: int) -> int:
    """Images rendered together at ``size``: 8 at 64, 2 at 128, 1 from 182 on."""
    return max(1, _BLOCK_SAMPLES // (2 * size) ** 2)


@dataclass(frozen=True)
class _Noise:
    """Two fixed periodic noise textures (zero mean, unit std): white grain and smooth blotches."""

    grain: TileSampler
    blotch: TileSampler

    @staticmethod
    def build(size: int = 512, seed: int = 20230617) -> "_Noise":
        rng = np.random.default_rng(seed)
        white = rng.standard_normal((size, size))
        freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")) * size
        # A 1/f-like spectrum cut off at about 40 cycles per tile: blotches of many sizes, no grain.
        smooth = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) / (1.0 + (freq / 3.0) ** 1.5)
                              * np.exp(-(freq / 40.0) ** 2)).real

        def unit(x: np.ndarray) -> TileSampler:
            return TileSampler(torch.from_numpy(((x - x.mean()) / x.std()).astype(np.float32)))

        return _Noise(unit(white), unit(smooth))


class HeadsDomain:
    """Synthetic heads with exact segmentation, depth and keypoints (see the module docstring).

    Classes: ``background, skin, hair, eye, brow, nose, mouth, ear, neck, cloth, accessory``
    (hats, glasses frames, earrings; glasses lenses are clear and not labeled).
    Keypoints: eyes, brows, nose tip, mouth corners, chin, ears (subject's left/right).
    """

    name = "heads"
    classes: tuple[str, ...] = CLASSES
    keypoint_names: tuple[str, ...] = KEYPOINT_NAMES
    far_depth: float = FAR_DEPTH

    def __init__(self) -> None:
        self._noise: Optional[_Noise] = None

    def __repr__(self) -> str:
        return "HeadsDomain()"

    def render(self, n: int, seed: int, size: int, start: int = 0) -> LabeledBatch:
        """Render images ``start .. start+n-1`` of sequence ``seed`` at ``size x size``.

        Args:
            n: number of images (>= 0).
            seed: sequence seed, ``0 <= seed < 2**63``.
            size: output side in pixels, even, 16 to 1024.
            start: index of the first image (>= 0).

        Returns:
            A `LabeledBatch`: images uint8 ``[n, size, size, 3]``, seg uint8 ``[n, size, size]``,
            depth float32 ``[n, size, size]``, keypoints float32 ``[n, 10, 3]``, names
            ``"s{seed}_{index:08d}"``.
        """
        _check_args(n, seed, size, start)
        if self._noise is None:
            self._noise = _Noise.build()
        block = block_size(size)
        parts = []
        for first in range(start - start % block, start + n, block):
            batch = _render_block(sample_scene(seed, np.arange(first, first + block)), size, self._noise, seed, first)
            lo, hi = max(start, first) - first, min(start + n, first + block) - first
            parts.append(batch if (lo, hi) == (0, block) else batch.select(slice(lo, hi)))
        if not parts:
            return _empty(size, len(self.keypoint_names))
        return parts[0] if len(parts) == 1 else LabeledBatch.concat(parts)


def _check_args(n: int, seed: int, size: int, start: int) -> None:
    for name, value in (("n", n), ("seed", seed), ("size", size), ("start", start)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"render: {name} must be an int, got {type(value).__name__}")
    if n < 0 or start < 0 or not 0 <= seed < 2**63:
        raise ValueError(f"render: need n >= 0, start >= 0 and 0 <= seed < 2**63 (got n={n}, start={start}, seed={seed})")
    if not (16 <= size <= 1024 and size % 2 == 0):
        raise ValueError(f"render: size must be even and in [16, 1024], got {size}")


def _empty(size: int, k: int) -> LabeledBatch:
    return LabeledBatch(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8),
                        np.zeros((0, size, size), np.float32), np.zeros((0, k, 3), np.float32), [])


# ---------------------------------------------------------------------------------------------
# Geometry

def _hair_keep(c: HairClip) -> ClipFn:
    """The clip margin of a hair or hat shell (see `HairClip`): ``qy - line(qx, qz)``."""
    y_side = per_image(c.y_side)
    front_rise, back_drop = per_image(c.y_front - c.y_side), per_image(c.y_back - c.y_side)
    front_cut, back_cut, part = per_image(c.front_cut), per_image(c.back_cut), per_image(c.part)
    fringe = bool((c.fringe_amp > 0).any())
    amp, freq, phase = per_image(c.fringe_amp), per_image(c.fringe_freq), per_image(c.fringe_phase)

    def keep(qx: Tensor, qy: Tensor, qz: Tensor) -> Tensor:
        # Blend over 0.2 of the unit sphere so that the hairline is a smooth curve, not a kink.
        to_front = ((qz - front_cut) * 5.0).clamp_(0.0, 1.0)
        to_back = ((-qz - back_cut) * 5.0).clamp_(0.0, 1.0)
        front_line = part * qx + front_rise
        if fringe:
            front_line += amp * tri(qx * freq + phase)
        line = front_line.mul_(to_front).add_(y_side).add_(to_back.mul_(back_drop))
        return qy.sub_(line)

    return keep


@dataclass(frozen=True)
class _Lens:
    """Inside the glasses' lenses (0/1 ``[N, h, w]`` on a window) and the depth of the lens plane."""

    window: Grid
    inside: Tensor
    depth: Tensor


def _glasses(grid: Grid, scene: HeadScene) -> tuple[Optional[Grid], Tensor, Optional[_Lens]]:
    """The glasses frame, a masked plane in the head frame, and its lenses.

    Returns the window that holds them (None without glasses), the frame's depth there
    (>= MISS off the frame) and the lenses.
    """
    g = scene.glasses
    z_field = scene.local[2]
    enabled = g.enabled & (np.abs(z_field.at) * scene.head.scale > 0.05)  # not seen edge-on
    zero = np.zeros(scene.n)
    top, bottom = np.maximum(g.lens_y + g.lens_h, g.bar_y + g.bar_h), g.lens_y - g.lens_h
    corners = np.stack([np.stack([sx * g.temple_x, y, g.plane_z], -1) for sx in (-1, 1) for y in (top, bottom)], 1)
    box = np.where(enabled[:, None], points_box(scene.head.point(corners)), np.nan)
    win = grid.window(box)
    if win is None:
        return None, no_hits(scene.n, grid), None
    z_field = Linear(z_field.au, z_field.av, np.where(enabled, z_field.at, 1.0), z_field.a0)
    plane_t = z_field.solve_t(g.plane_z)
    x = scene.local[0].substitute_t(plane_t).at_depth(win).abs_()
    y = scene.local[1].substitute_t(plane_t).at_depth(win)
    t = plane_t.at_depth(win)
    dx = (x - per_image(g.lens_x)).mul_(per_image(1.0 / g.lens_w))
    dy = (y - per_image(g.lens_y)).mul_(per_image(1.0 / g.lens_h))
    ring = dx.mul_(dx).add_(dy.mul_(dy))  # < 1 inside the rim's outer ellipse
    bar = torch.minimum(per_image(g.bar_h) - (y - per_image(g.bar_y)).abs_(), per_image(g.temple_x) - x)
    frame = torch.minimum(torch.maximum(1.0 - ring, bar), ring - per_image(g.rim))
    frame_t = torch.maximum(t, penalty(frame)) + per_image(np.where(enabled, zero, MISS))
    return win, frame_t, _Lens(win, step(per_image(g.rim) - ring).mul_(per_image(enabled)), t)


def _first_hits(grid: Grid, scene: HeadScene) -> tuple[Tensor, Tensor, Optional[_Lens]]:
    """Z-buffer over all primitives: depth ``[N, H, W]``, primitive id (int32) and the lenses."""
    zbuf = ZBuffer(scene.n, grid.res, int(Prim.BACKGROUND))
    clips = {Prim.HAIR: (scene.hair_unit, scene.hair_clip), Prim.HAT: (scene.hat_unit, scene.hat_clip)}
    for prim in Prim:
        if prim >= Prim.GLASSES:
            continue
        ellipsoid = scene.prims[prim]
        win = grid.window(ellipsoid.screen_box())
        if win is None:
            continue
        if prim in clips:
            unit, clip = clips[prim]
            zbuf.add(clipped_ellipsoid_depth(win, ellipsoid, unit, _hair_keep(clip)), prim, win)
        else:
            zbuf.add(ellipsoid_depth(win, ellipsoid)[0], prim, win)
    win, frame, lens = _glasses(grid, scene)
    if win is not None:
        zbuf.add(frame, Prim.GLASSES, win)
    depth, pid = zbuf.result()
    return depth, pid, lens


# ---------------------------------------------------------------------------------------------
# Surfaces: decals and shading

@dataclass(frozen=True)
class _Surface:
    """Per-sample surface after decals: material id (int32 ``[N, H, W]``) and eye-socket shadows.

    ``occlusion`` (``[N, h, w]`` on ``window``, None without a face in view) multiplies the albedo.
    """

    material: Tensor
    window: Optional[Grid]
    occlusion: Optional[Tensor]


def _face_window(grid: Grid, scene: HeadScene) -> Optional[Grid]:
    """The window that holds every face's decals (a box in head-local units, projected)."""
    corners = np.array([[x, y, z] for x in (-0.7, 0.7) for y in (-0.85, 0.55) for z in (0.0, 1.2)])
    return grid.window(points_box(scene.head.point(np.broadcast_to(corners, (scene.n, 8, 3)))))


def _decals(grid: Grid, scene: HeadScene, depth: Tensor, pid: Tensor) -> _Surface:
    """Paint eyes, brows and lips onto the skin (skull and jaw) facing forward.

    Each decal is a margin (> 0 inside); painting keeps the running maximum of material ids,
    so later decals (higher `Mat` ids) cover earlier ones.
    """
    material = pid.float()
    win = _face_window(grid, scene)
    if win is None:
        return _Surface(material.int(), None, None)
    f = scene.face
    mat = win.crop(material)
    x, y, z = (c.at_depth(win, win.crop(depth)) for c in scene.local)
    face = step(mat * -1.0 + (Prim.JAW + 0.5)).mul_(step(z))
    ax = x.abs()

    def paint(margin: Tensor, decal: Mat) -> None:
        torch.maximum(mat, step(margin, float(decal)).mul_(face), out=mat)

    # Brows: an arched band tapering outwards, tilted by `slant`.
    sb = (ax - per_image(f.brow_x)) * per_image(1.0 / f.brow_w)
    sb2 = sb * sb
    centre = per_image(f.brow_y) + per_image(f.brow_arch) * (1.0 - sb2) + per_image(f.brow_slant * f.brow_w) * sb
    band = per_image(f.brow_thick) * (1.0 - 0.6 * sb2) - (y - centre).abs_()
    paint(torch.minimum(band, 1.0 - sb2), Mat.BROW)

    # Eyes: an almond |dy| < h (1 - s^2); iris and pupil follow the gaze, mirrored per side.
    se = (ax - per_image(f.eye_x)) * per_image(1.0 / f.eye_w)
    opening = per_image(f.eye_h) * (1.0 - se * se)
    dy = y - per_image(f.eye_y)
    eye = opening - dy.abs()
    paint(eye, Mat.SCLERA)
    xi = (ax - per_image(f.eye_x)) * torch.sign(x) - per_image(f.gaze_x)
    yi = dy - per_image(f.gaze_y)
    r2 = xi * xi + yi * yi
    paint(torch.minimum(eye, per_image(f.iris_r**2) - r2), Mat.IRIS)
    paint(torch.minimum(eye, per_image(f.pupil_r**2) - r2), Mat.PUPIL)
    paint(torch.minimum(eye, dy - opening * per_image(f.liner)), Mat.LINER)

    # Lips: upper and lower lens shapes around a (smiling) mouth line.
    sm = x * per_image(1.0 / f.mouth_w)
    sm2 = sm * sm
    envelope = 1.0 - sm2
    dm = y - (per_image(f.mouth_y) + per_image(f.smile) * sm2)
    paint(torch.minimum(dm + 1e-6, per_image(f.lip_upper) * envelope - dm), Mat.LIP_UPPER)
    paint(torch.minimum(-dm, per_image(f.lip_lower) * envelope + dm), Mat.LIP_LOWER)
    paint(per_image(f.gap) * envelope - dm.abs(), Mat.MOUTH_GAP)

    # Sockets: darken an ellipse around each eye a little, a cheap stand-in for occlusion.
    sy = (dy - 0.02) * per_image(1.0 / (3.0 * f.eye_h))
    socket = (1.0 - se * se * (1 / 1.7**2) - sy * sy).clamp_(0.0, 1.0)
    occlusion = 1.0 - socket.mul_(per_image(f.socket)).mul_(face)
    return _Surface(material.int(), win, occlusion)


def _gather(table: np.ndarray, ids: Tensor) -> list[Tensor]:
    """Per-image table ``[N, M, C]`` looked up at per-sample ids (int32 ``[N, H, W]``): C x ``[N, H, W]``.

    One 1-D ``index_select`` per channel: the fastest CPU gather (a row gather needs a
    transposition afterwards that costs more than the gather).
    """
    n, m, c = table.shape
    flat = torch.from_numpy(np.ascontiguousarray(table.transpose(2, 0, 1).reshape(c, n * m), dtype=np.float32))
    index = (ids + torch.arange(0, n * m, m, dtype=torch.int32).view(-1, 1, 1)).view(-1)
    return [flat[k].index_select(0, index).view(ids.shape) for k in range(c)]


def _geometry_table(scene: HeadScene) -> np.ndarray:
    """``[N, N_PRIMS, 9]``: the normal field ``n = Q p + b`` per primitive (Q: xx yy zz xy xz yz; b).

    For an ellipsoid ``n = Q (p - centre)``; for the glasses plane ``Q = 0`` and ``b`` is its
    normal; the background faces the camera.
    """
    table = np.zeros((scene.n, N_PRIMS, 9))
    for prim in Prim:
        if prim < Prim.GLASSES:
            e = scene.prims[prim]
            q = e.quadric()
            table[:, prim, :6] = np.stack([q[:, 0, 0], q[:, 1, 1], q[:, 2, 2], q[:, 0, 1], q[:, 0, 2], q[:, 1, 2]], -1)
            table[:, prim, 6:] = -np.einsum("nij,nj->ni", q, e.centre)
    table[:, Prim.GLASSES, 6:] = scene.head.axes[:, :, 2]
    table[:, Prim.BACKGROUND, 8] = -1.0
    return table


def _normals(grid: Grid, scene: HeadScene, depth: Tensor, pid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit normals facing the camera, ``3 x [N, H, W]``, of the primitive hit first."""
    qxx, qyy, qzz, qxy, qxz, qyz, bx, by, bz = _gather(_geometry_table(scene), pid)
    u, v = grid.u, grid.v
    nx = qxx * u + qxy * v + qxz * depth + bx
    ny = qxy * u + qyy * v + qyz * depth + by
    nz = qxz * u + qyz * v + qzz * depth + bz
    # Two-sided: the inside of a hair shell or a hat is lit like its outside (flip if nz > 0).
    flip = 1.0 - step(nz, 2.0)
    norm = flip.div_((nx * nx + ny * ny + nz * nz + 1e-12).sqrt_())
    return nx.mul_(norm), ny.mul_(norm), nz.mul_(norm)


def _dot(a: tuple[Tensor, Tensor, Tensor], b: np.ndarray) -> Tensor:
    """Per-sample vectors ``3 x [N, H, W]`` dotted with per-image vectors ``[N, 3]``."""
    return a[0] * per_image(b[:, 0]) + a[1] * per_image(b[:, 1]) + a[2] * per_image(b[:, 2])


def _shade(grid: Grid, scene: HeadScene, noise: _Noise, depth: Tensor, pid: Tensor,
           surface: _Surface, lens: Optional[_Lens], size: int) -> Tensor:
    """Shaded foreground colour ``[N, 3, H, W]`` (0 on the background)."""
    normal = _normals(grid, scene, depth, pid)
    attrs = _gather(scene.materials, surface.material)
    light, tex = scene.light, scene.textures

    wrap = attrs[Ch.WRAP]
    diffuse = (_dot(normal, light.direction) + wrap).div_(wrap + 1.0).clamp_(min=0.0)
    ndh = _dot(normal, light.half).clamp_(min=0.0)
    shine = attrs[Ch.SHINE]
    # Schlick's rational x**m ~ x / (m - m x + x): a power without `pow`.
    specular = ndh / (shine - shine * ndh + ndh) * attrs[Ch.SPEC]

    grain = noise.grain.sample(grid, np.full(scene.n, 2.0 * size), tex.grain_offset)
    blotch = noise.blotch.sample(grid, tex.blotch_scale, tex.blotch_offset)
    detail = attrs[Ch.GRAIN] * grain + attrs[Ch.BLOTCH] * blotch + 1.0
    hair = grid.window(np.concatenate([scene.prims[Prim.HAIR].screen_box(), scene.prims[Prim.HAIR_BACK].screen_box()]))
    if hair is not None:
        d = hair.crop(depth)
        x, z = scene.local[0].at_depth(hair, d), scene.local[2].at_depth(hair, d)
        around = x / (x * x + z * z + 0.01).sqrt_()  # sine of the angle around the vertical axis
        strands = tri(around * per_image(tex.strand_freq) + 0.35 * hair.crop(blotch)) - 0.5
        hair.crop(detail).add_(hair.crop(attrs[Ch.STRAND]) * strands)
    if (scene.materials[:, :, Ch.STRIPE] > 0).any():
        phase = per_image(tex.stripe_u) * grid.u + per_image(tex.stripe_v) * grid.v
        stripes = ((tri(phase) - 0.5) * 4.0).clamp_(-0.5, 0.5)
        detail += attrs[Ch.STRIPE] * stripes
    if surface.window is not None:
        surface.window.crop(detail).mul_(surface.occlusion)

    behind_lens = None
    if lens is not None:  # tinted glass over whatever lies behind the lens
        behind_lens = step(lens.window.crop(depth) - lens.depth).mul_(lens.inside)
    channels = []
    for c in range(3):
        lit = per_image(light.diffuse[:, c]) * diffuse + per_image(light.ambient[:, c])
        colour = attrs[c] * detail * lit + specular * per_image(light.specular[:, c])
        if lens is not None:
            lens.window.crop(colour).mul_(behind_lens * per_image(scene.glasses.tint[:, c] - 1.0) + 1.0)
        channels.append(colour)
    return torch.stack(channels, 1)


# ---------------------------------------------------------------------------------------------
# Background

def _backdrop(grid: Grid, b: Backdrop, noise: _Noise, scene: HeadScene) -> Tensor:
    """Background at the output size ``[N, 3, H, W]``: gradient, blotches, soft-edged shapes."""
    ramp = (per_image(b.direction[:, 0]) * grid.u + per_image(b.direction[:, 1]) * grid.v + 0.5).clamp_(0.0, 1.0)
    blotch = noise.blotch.sample(grid, scene.textures.blotch_scale * 0.5, scene.textures.blotch_offset[:, ::-1])
    texture = per_image(b.blotch) * blotch + 1.0
    colour = [(per_image(b.colour1[:, c] - b.colour0[:, c]) * ramp + per_image(b.colour0[:, c])) * texture
              for c in range(3)]
    pixel = 2.0 / grid.res
    for k in range(b.kind.shape[1]):
        if not (b.opacity[:, k] > 0).any():
            continue
        du = grid.u - per_image(b.centre[:, k, 0])
        dv = grid.v - per_image(b.centre[:, k, 1])
        cos, sin = per_image(b.angle[:, k, 0]), per_image(b.angle[:, k, 1])
        xr = cos * du + sin * dv
        yr = cos * dv - sin * du
        sx, sy = b.size[:, k, 0], b.size[:, k, 1]
        ex, ey = xr * per_image(1.0 / sx), yr * per_image(1.0 / sy)
        ellipse = (ex * ex + ey * ey).sqrt_().sub_(1.0).mul_(per_image(np.minimum(sx, sy)))
        rectangle = torch.maximum(xr.abs() - per_image(sx), yr.abs() - per_image(sy))
        is_rect = per_image(b.kind[:, k].astype(np.float64))
        distance = ellipse + (rectangle - ellipse) * is_rect
        alpha = (0.5 - distance * (1.0 / pixel)).clamp_(0.0, 1.0).mul_(per_image(b.opacity[:, k]))
        shade = (tri(xr * per_image(b.stripe_freq[:, k])) - 0.5) * per_image(b.stripes[:, k]) + 1.0
        for c in range(3):
            target = per_image(b.colour[:, k, c]) * shade
            colour[c] = colour[c] + (target - colour[c]) * alpha
    return torch.stack(colour, 1)


# ---------------------------------------------------------------------------------------------
# Assembly

def _keypoints(scene: HeadScene, depth2: np.ndarray, size: int) -> np.ndarray:
    """Project the anchors: ``[N, K, 3]`` (x, y in output pixels, visible 0/1)."""
    anchors = scene.keypoints
    px = (anchors[..., 0] + 1.0) * (0.5 * size)
    py = (1.0 - anchors[..., 1]) * (0.5 * size)
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    res2 = 2 * size
    col = np.clip(np.floor(px * 2).astype(np.int64), 0, res2 - 1)
    row = np.clip(np.floor(py * 2).astype(np.int64), 0, res2 - 1)
    batch = np.arange(scene.n)[:, None]
    farthest = np.full(px.shape, -np.inf)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            r, c = np.clip(row + di, 0, res2 - 1), np.clip(col + dj, 0, res2 - 1)
            farthest = np.maximum(farthest, depth2[batch, r, c])
    visible = inside & (farthest >= anchors[..., 2] - scene.visibility_tol[:, None])
    return np.stack([px, py, visible.astype(np.float64)], -1).astype(np.float32)


_MATERIAL_CLASS = torch.from_numpy(MATERIAL_CLASS.astype(np.int32))


def _render_block(scene: HeadScene, size: int, noise: _Noise, seed: int, first: int) -> LabeledBatch:
    """Render one block of images: see the module docstring for the steps."""
    grid2, grid1 = Grid.square(2 * size), Grid.square(size)
    depth2, pid, lens = _first_hits(grid2, scene)
    surface = _decals(grid2, scene, depth2, pid)
    foreground = _shade(grid2, scene, noise, depth2, pid, surface, lens, size)

    coverage = pool_2x2(step(Prim.BACKGROUND - 0.5 - pid.float())).unsqueeze(1)
    image = pool_2x2(foreground) + (1.0 - coverage) * _backdrop(grid1, scene.backdrop, noise, scene)
    grain = noise.grain.sample(grid1, np.full(scene.n, float(size)), scene.textures.grain_offset[:, ::-1])
    image = (image - 0.5) * per_image(scene.contrast).unsqueeze(1) + (per_image(scene.grain) * grain).unsqueeze(1) \
        + per_image(0.5 + scene.brightness).unsqueeze(1)
    pixels = torch.floor(image.clamp_(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)

    classes = _MATERIAL_CLASS.index_select(0, surface.material.view(-1)).view(surface.material.shape)
    seg, depth = majority_2x2(classes, depth2)
    return LabeledBatch(
        images=np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy()),
        seg=seg.to(torch.uint8).numpy(),
        depth=depth.numpy(),
        keypoints=_keypoints(scene, depth2.numpy(), size),
        names=[f"s{seed}_{i:08d}" for i in range(first, first + scene.n)],
    )
