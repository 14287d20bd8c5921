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
2. Decals replace the material of skin samples; materials are gathered per sample from
   small per-image tables and shaded once per sample (deferred shading: normals from the
   depth map's slopes, Lambert with wrap-around + Blinn-Phong specular, textures as
   multiplicative detail).
3. Antialiasing: the shaded foreground and its coverage are averaged over each 2x2 block
   (area downsampling) and composited over the background, which is drawn at the output
   size with one-pixel soft edges.
4. Labels come from the same 2x2 samples: ``seg`` is the majority class of the block (ties
   go to the nearest sample) and ``depth`` is that sample's depth, so a label and its depth
   always belong to one surface. Background depth is `FAR_DEPTH` (10.0); heads sit at a
   depth of about 5 in units where the frame spans [-1, 1].
5. Keypoints are 3-D anchors on the surfaces, projected; a keypoint is visible when it lies
   inside the frame and the supersample that holds it sees the keypoint's own part at the
   keypoint's depth (within 10% of the head radius), see `_keypoints`.

Determinism: image ``i`` of seed ``s`` depends only on ``(s, i, size)`` (on one software
stack). Images are rendered in fixed blocks of `block_size` consecutive indices, whatever
range was asked for, and the per-sample arithmetic avoids operations whose result depends on
vectorisation, so a range gives the same bytes however it is split into calls (and with any
thread count or block size, which the tests check).

Speed: the work is a few hundred elementwise tensor operations per block, most of them on
small per-part regions (`raster.Region`). On a CPU one torch thread per process is the
efficient setting (`parallel.render_chunks` runs one process per core); see
``benchmarks/domain.py`` for measured throughput.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from handsoff.domains.base import LabeledBatch
from handsoff.domains.heads_scene import (
    BACKDROP_KINDS,
    CLASSES,
    KEYPOINT_NAMES,
    KEYPOINT_PRIMS,
    MATERIAL_CLASS,
    Backdrop,
    Ch,
    FaceDecals,
    HairClip,
    HeadScene,
    Mat,
    Prim,
    sample_scene,
)
from handsoff.domains.raster import (
    FAR_DEPTH,
    MISS,
    ClipFn,
    Grid,
    Linear,
    Region,
    TileSampler,
    ZBuffer,
    clipped_ellipsoid_depth,
    ellipsoid_depth,
    majority_2x2,
    no_hits,
    penalty,
    per_image,
    points_box,
    pool_2x2,
    step,
    tri,
    union_box,
)

__all__ = ["HeadsDomain", "FAR_DEPTH", "block_size"]

#: Samples per block at the 2x render (2 MiB per float tensor): large enough that the fixed
#: cost of each tensor operation is small next to its work, small enough to stay in cache.
_BLOCK_SAMPLES = 1 << 19


def block_size(size: int) -> int:
    """Images rendered together at ``size``: 32 at 64, 8 at 128, 2 at 256, 1 from 363 on."""
    return max(1, _BLOCK_SAMPLES // (2 * size) ** 2)


@dataclass(frozen=True)
class _Noise:
    """Fixed periodic noise textures (zero mean, unit std): white grain, smooth blotches, and
    their mix that surfaces use (so that one lookup gives both)."""

    grain: TileSampler
    blotch: TileSampler
    surface: TileSampler

    @staticmethod
    def build(size: int = 512, seed: int = 20230617) -> "_Noise":
        rng = np.random.default_rng(seed)
        white = rng.standard_normal((size, size))
        freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")) * size
        # A 1/f-like spectrum cut off at about 40 cycles per tile: blotches of many sizes, no grain.
        smooth = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) / (1.0 + (freq / 3.0) ** 1.5)
                              * np.exp(-(freq / 40.0) ** 2)).real

        def unit(x: np.ndarray) -> np.ndarray:
            return (x - x.mean()) / x.std()

        def sampler(x: np.ndarray) -> TileSampler:
            return TileSampler(torch.from_numpy(unit(x).astype(np.float32)))

        return _Noise(sampler(white), sampler(smooth), sampler(unit(smooth) + 0.6 * unit(white)))


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

    def block_size(self, size: int) -> int:
        """Images rendered together at ``size``; ranges aligned to it waste nothing."""
        return block_size(size)

    def __getstate__(self) -> dict:
        return {"noise": None}  # the noise textures are rebuilt on first use (cheaper than pickling)

    def __setstate__(self, state: dict) -> None:
        self._noise = state["noise"]

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
        raise ValueError(f"render: need n >= 0, start >= 0 and 0 <= seed < 2**63 "
                         f"(got n={n}, start={start}, seed={seed})")
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
    """Inside the glasses' lenses (0/1 ``[N, h, w]`` on ``region``) and the depth of the lens plane."""

    region: Region
    inside: Tensor
    depth: Tensor


def _glasses(grid: Grid, scene: HeadScene) -> tuple[Optional[Region], Tensor, Optional[_Lens]]:
    """The glasses frame, a masked plane in the head frame, and its lenses.

    Returns the region that holds them (None without glasses), the frame's depth there
    (>= MISS off the frame) and the lenses.
    """
    g = scene.glasses
    z_field = scene.local[2]
    enabled = g.enabled & (np.abs(z_field.at) * scene.head.scale > 0.05)  # not seen edge-on
    top, bottom = np.maximum(g.lens_y + g.lens_h, g.bar_y + g.bar_h), g.lens_y - g.lens_h
    corners = np.stack([np.stack([sx * g.temple_x, y, g.plane_z], -1) for sx in (-1, 1) for y in (top, bottom)], 1)
    region = Region.of(grid, np.where(enabled[:, None], points_box(scene.head.point(corners)), np.nan))
    if region is None:
        return None, no_hits(scene.n, grid), None
    win = region.grid
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
    frame_t = torch.maximum(t, penalty(frame)) + per_image(np.where(enabled, 0.0, MISS))
    return region, frame_t, _Lens(region, step(per_image(g.rim) - ring).mul_(per_image(enabled)), t)


def _first_hits(grid: Grid, scene: HeadScene) -> tuple[Tensor, Tensor, Optional[_Lens]]:
    """Z-buffer over all primitives: depth ``[N, H, W]``, primitive id (int32) and the lenses."""
    zbuf = ZBuffer(scene.n, grid.res, int(Prim.BACKGROUND))
    clips = {Prim.HAIR: (scene.hair_unit, scene.hair_clip), Prim.HAT: (scene.hat_unit, scene.hat_clip)}
    for prim in Prim:
        if prim >= Prim.GLASSES:
            continue
        ellipsoid = scene.prims[prim]
        region = Region.of(grid, ellipsoid.screen_box())
        if region is None:
            continue
        if prim in clips:
            unit, clip = clips[prim]
            zbuf.add(clipped_ellipsoid_depth(region.grid, ellipsoid, unit, _hair_keep(clip)), prim, region)
        else:
            zbuf.add(ellipsoid_depth(region.grid, ellipsoid)[0], prim, region)
    region, frame, lens = _glasses(grid, scene)
    if region is not None:
        zbuf.add(frame, Prim.GLASSES, region)
    depth, pid = zbuf.result()
    return depth, pid, lens


# ---------------------------------------------------------------------------------------------
# Surfaces: decals and shading

@dataclass(frozen=True)
class _Surface:
    """Per-sample surface after decals: material id (int32 ``[N, H, W]``) and eye-socket shadows.

    ``occlusion`` (``[N, h, w]`` on ``region``, None without eyes in view) multiplies the albedo.
    """

    material: Tensor
    region: Optional[Region]
    occlusion: Optional[Tensor]


def _local_box_region(grid: Grid, scene: HeadScene, x: np.ndarray, y0: np.ndarray, y1: np.ndarray,
                      z0: float, z1: float) -> Optional[Region]:
    """The region of a head-local box ``|x| < x``, ``y0 < y < y1``, ``z0 < z < z1`` (``[N]`` each)."""
    corners = np.stack([np.stack([sx * x, y, np.full(scene.n, z)], -1)
                        for sx in (-1.0, 1.0) for y in (y0, y1) for z in (z0, z1)], 1)
    return Region.of(grid, points_box(scene.head.point(corners)))


class _Painter:
    """Paints decals on the front of the skin inside one region, in head-local coordinates.

    Each decal is a margin (> 0 inside); painting keeps the running maximum of material ids,
    so later decals (higher `Mat` ids) cover earlier ones.
    """

    def __init__(self, region: Region, scene: HeadScene, depth: Tensor, material: Tensor) -> None:
        self.region, self.material = region, region.take(material)
        self.x, self.y, z = (c.at_depth(region.grid, region.take(depth)) for c in scene.local)
        self.face = step(self.material * -1.0 + (Prim.JAW + 0.5)).mul_(step(z))

    def paint(self, margin: Tensor, decal: Mat) -> None:
        torch.maximum(self.material, step(margin, float(decal)).mul_(self.face), out=self.material)

    def finish(self, material: Tensor) -> None:
        self.region.put(material, self.material)


def _paint_eyes(p: _Painter, f: FaceDecals) -> Tensor:
    """Brows and eyes (mirrored about x = 0); returns the eye-socket shading ``[N, h, w]``."""
    ax = p.x.abs()
    # Brows: an arched band tapering outwards, tilted by `slant`.
    sb = (ax - per_image(f.brow_x)) * per_image(1.0 / f.brow_w)
    sb2 = sb * sb
    centre = per_image(f.brow_y) + per_image(f.brow_arch) * (1.0 - sb2) + per_image(f.brow_slant * f.brow_w) * sb
    band = per_image(f.brow_thick) * (1.0 - 0.6 * sb2) - (p.y - centre).abs_()
    p.paint(torch.minimum(band, 1.0 - sb2), Mat.BROW)

    # Eyes: an almond |dy| < h (1 - s^2); iris and pupil follow the gaze.
    se = (ax - per_image(f.eye_x)) * per_image(1.0 / f.eye_w)
    opening = per_image(f.eye_h) * (1.0 - se * se)
    dy = p.y - per_image(f.eye_y)
    eye = opening - dy.abs()
    p.paint(eye, Mat.SCLERA)
    xi = (ax - per_image(f.eye_x)) * torch.sign(p.x) - per_image(f.gaze_x)
    yi = dy - per_image(f.gaze_y)
    r2 = xi * xi + yi * yi
    p.paint(torch.minimum(eye, per_image(f.iris_r**2) - r2), Mat.IRIS)
    p.paint(torch.minimum(eye, per_image(f.pupil_r**2) - r2), Mat.PUPIL)
    p.paint(torch.minimum(eye, dy - opening * per_image(f.liner)), Mat.LINER)

    # Sockets: darken an ellipse around each eye a little, a cheap stand-in for occlusion.
    sy = (dy - 0.02) * per_image(1.0 / (3.0 * f.eye_h))
    socket = (1.0 - se * se * (1 / 1.7**2) - sy * sy).clamp_(0.0, 1.0)
    return 1.0 - socket.mul_(per_image(f.socket)).mul_(p.face)


def _paint_mouth(p: _Painter, f: FaceDecals) -> None:
    """Upper and lower lips, lens shapes around a (smiling) mouth line, and the gap between."""
    sm = p.x * per_image(1.0 / f.mouth_w)
    sm2 = sm * sm
    envelope = 1.0 - sm2 * sm2  # full lips that end in rounded corners
    dm = p.y - (per_image(f.mouth_y) + per_image(f.smile) * sm2)
    p.paint(torch.minimum(dm + 1e-6, per_image(f.lip_upper) * envelope - dm), Mat.LIP_UPPER)
    p.paint(torch.minimum(-dm, per_image(f.lip_lower) * envelope + dm), Mat.LIP_LOWER)
    p.paint(per_image(f.gap) * envelope - dm.abs(), Mat.MOUTH_GAP)


def _decals(grid: Grid, scene: HeadScene, depth: Tensor, pid: Tensor) -> _Surface:
    """Paint eyes, brows and lips onto the skin (skull and jaw) facing forward.

    Eyes and mouth are painted in two small regions (boxes in head-local units, projected)
    rather than over the whole frame.
    """
    f = scene.face
    material = pid.float()
    top = np.maximum(f.eye_y + 0.02 + 3.0 * f.eye_h, f.brow_y + f.brow_arch + f.brow_thick)
    eyes = _local_box_region(grid, scene, np.maximum(f.eye_x + 1.7 * f.eye_w, f.brow_x + f.brow_w) + 0.02,
                             f.eye_y + 0.02 - 3.0 * f.eye_h, top + 0.02, 0.3, 1.15)
    mouth = _local_box_region(grid, scene, f.mouth_w + 0.02, f.mouth_y - f.lip_lower - 0.02,
                              f.mouth_y + np.maximum(f.smile, 0.0) + f.lip_upper + 0.02, 0.3, 1.15)
    occlusion = None
    if eyes is not None:
        painter = _Painter(eyes, scene, depth, material)
        occlusion = _paint_eyes(painter, f)
        painter.finish(material)
    if mouth is not None:
        painter = _Painter(mouth, scene, depth, material)
        _paint_mouth(painter, f)
        painter.finish(material)
    return _Surface(material.int(), eyes, occlusion)


def _gather(table: np.ndarray, ids: Tensor) -> list[Tensor]:
    """Per-image table ``[N, M, C]`` looked up at per-sample ids (int32 ``[N, H, W]``): C x ``[N, H, W]``.

    One 1-D ``index_select`` per channel: the fastest CPU gather (a row gather needs a
    transposition afterwards that costs more than the gather).
    """
    n, m, c = table.shape
    flat = torch.from_numpy(np.ascontiguousarray(table.transpose(2, 0, 1).reshape(c, n * m), dtype=np.float32))
    index = (ids + torch.arange(0, n * m, m, dtype=torch.int32).view(-1, 1, 1)).view(-1)
    return [flat[k].index_select(0, index).view(ids.shape) for k in range(c)]


def _slope(diffs: Tensor, dim: int) -> Tensor:
    """Per-sample depth slope along ``dim`` from neighbour differences ``[..., L - 1]`` -> ``[..., L]``.

    Of the forward and the backward difference the smaller one is taken: across an occluding
    edge one of them jumps, the other stays on the sample's own surface.
    """
    first, last = diffs.narrow(dim, 0, 1), diffs.narrow(dim, diffs.shape[dim] - 1, 1)
    forward, backward = torch.cat([diffs, last], dim), torch.cat([first, diffs], dim)
    pick_forward = step(backward.abs() - forward.abs())
    return forward.sub_(backward).mul_(pick_forward).add_(backward)


def _normals(grid: Grid, depth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit normals facing the camera, ``3 x [N, H, W]``, from the slopes of the depth map.

    The surface ``(u, v, t(u, v))`` has the camera-facing normal ``(t_u, t_v, -1)``; rows run
    downwards, so ``t_v`` is minus the row difference. (Per-sample gathers of each
    primitive's analytic normal cost several times more on a CPU; the depth map holds the
    same information away from edges.)
    """
    spacing = 2.0 / grid.res
    t_u = _slope(depth[:, :, 1:] - depth[:, :, :-1], 2).mul_(1.0 / spacing)
    t_v = _slope(depth[:, :-1, :] - depth[:, 1:, :], 1).mul_(1.0 / spacing)
    norm = (t_u * t_u + t_v * t_v + 1.0).sqrt_().reciprocal_()
    return t_u.mul_(norm), t_v.mul_(norm), norm.neg_()


def _dot(a: tuple[Tensor, Tensor, Tensor], b: np.ndarray) -> Tensor:
    """Per-sample vectors ``3 x [N, H, W]`` dotted with per-image vectors ``[N, 3]``."""
    return a[0] * per_image(b[:, 0]) + a[1] * per_image(b[:, 1]) + a[2] * per_image(b[:, 2])


#: Wrap-around diffuse: light bleeds a little past the terminator (softer, skin-like shading).
_WRAP = 0.3


def _is_prim(pid: Tensor, first: Prim, last: Prim) -> Tensor:
    """1 where the (float) primitive id is in ``first..last``, else 0."""
    return step((last - first) * 0.5 + 0.5 - (pid - (first + last) * 0.5).abs_())


def _detail(grid: Grid, scene: HeadScene, noise: _Noise, depth: Tensor, pid_f: Tensor, attrs: list[Tensor],
            surface: _Surface) -> Tensor:
    """Multiplicative albedo detail ``[N, H, W]``: noise, hair strands, cloth stripes, sockets."""
    tex = scene.textures
    texture = noise.surface.sample(grid, tex.noise_scale, tex.noise_offset)
    detail = attrs[Ch.NOISE] * texture + 1.0
    hair = Region.of(grid, union_box(*(scene.prims[p].screen_box() for p in (Prim.HAIR, Prim.HAIR_BACK))))
    if hair is not None:  # strands run along meridians of the head, on HAIR and HAIR_BACK
        d = hair.take(depth)
        x, z = scene.local[0].at_depth(hair.grid, d), scene.local[2].at_depth(hair.grid, d)
        around = x / (x * x + z * z + 0.01).sqrt_()  # sine of the angle around the vertical axis
        strands = tri(around * per_image(tex.strand_freq) + 0.35 * hair.take(texture)) - 0.5
        on_hair = _is_prim(hair.take(pid_f), Prim.HAIR, Prim.HAIR_BACK).mul_(per_image(tex.strand_amp))
        hair.put(detail, hair.take(detail).add_(strands.mul_(on_hair)))
    striped = (tex.cloth_stripes > 0) | (tex.hat_stripes > 0) & scene.prims[Prim.HAT].enabled
    boxes = [scene.prims[p].screen_box() for p in (Prim.TORSO, Prim.HAT, Prim.BRIM)]
    cloth = Region.of(grid, np.where(striped[:, None], union_box(*boxes), np.nan))
    if cloth is not None:  # stripes in the picture plane, at a per-image angle and frequency
        phase = cloth.grid.affine(tex.stripe_u, tex.stripe_v, np.zeros(scene.n))
        stripes = ((tri(phase) - 0.5) * 4.0).clamp_(-0.5, 0.5)
        p = cloth.take(pid_f)
        amp = _is_prim(p, Prim.TORSO, Prim.TORSO).mul_(per_image(tex.cloth_stripes)) \
            + _is_prim(p, Prim.HAT, Prim.BRIM).mul_(per_image(tex.hat_stripes))
        cloth.put(detail, cloth.take(detail).add_(stripes.mul_(amp)))
    if surface.region is not None:
        surface.region.put(detail, surface.region.take(detail).mul_(surface.occlusion))
    return detail


def _shade(grid: Grid, scene: HeadScene, noise: _Noise, depth: Tensor, pid: Tensor,
           surface: _Surface, lens: Optional[_Lens]) -> list[Tensor]:
    """Shaded foreground colour, ``3 x [N, H, W]`` (R, G, B; 0 on the background)."""
    normal = _normals(grid, depth)
    attrs = _gather(scene.materials, surface.material)
    light = scene.light
    diffuse = (_dot(normal, light.direction) + _WRAP).mul_(1.0 / (1.0 + _WRAP)).clamp_(min=0.0)
    ndh = _dot(normal, light.half).clamp_(min=0.0)
    gloss = attrs[Ch.GLOSS]
    shine = gloss * 60.0 + 4.0
    # Schlick's rational x**m ~ x / (m - m x + x): a power without `pow`.
    specular = ndh / (shine - shine * ndh + ndh) * gloss
    detail = _detail(grid, scene, noise, depth, pid.float(), attrs, surface)

    behind_lens = None
    if lens is not None:  # tinted glass over whatever lies behind the lens
        behind_lens = step(lens.region.take(depth) - lens.depth).mul_(lens.inside)
    channels = []
    for c in range(3):
        lit = per_image(light.diffuse[:, c]) * diffuse + per_image(light.ambient[:, c])
        colour = attrs[c] * detail * lit + specular * per_image(light.specular[:, c])
        if lens is not None:
            tint = behind_lens * per_image(scene.glasses.tint[:, c] - 1.0) + 1.0
            lens.region.put(colour, lens.region.take(colour).mul_(tint))
        channels.append(colour)
    return channels


# ---------------------------------------------------------------------------------------------
# Background

def _shape_distance(grid: Grid, b: Backdrop, k: int) -> tuple[Tensor, Tensor]:
    """Signed distance (frame units) to background shape ``k`` and its first coordinate ``ex``."""
    cos, sin = b.angle[:, k, 0], b.angle[:, k, 1]
    sx, sy = b.size[:, k, 0], b.size[:, k, 1]
    cx, cy = b.centre[:, k, 0], b.centre[:, k, 1]
    # Shape coordinates, scaled so that the outline is |ex| = 1 or ex^2 + ey^2 = 1.
    ex = grid.affine(cos / sx, sin / sx, -(cos * cx + sin * cy) / sx)
    ey = grid.affine(-sin / sy, cos / sy, (sin * cx - cos * cy) / sy)
    if BACKDROP_KINDS[k] == 0:
        return (ex * ex + ey * ey).sqrt_().sub_(1.0).mul_(per_image(np.minimum(sx, sy))), ex
    return torch.maximum((ex.abs() - 1.0).mul_(per_image(sx)), (ey.abs() - 1.0).mul_(per_image(sy))), ex


def _backdrop(grid: Grid, b: Backdrop, noise: _Noise, scene: HeadScene) -> list[Tensor]:
    """Background at the output size, ``3 x [N, H, W]``: gradient, blotches, soft-edged shapes."""
    n = scene.n
    ramp = grid.affine(b.direction[:, 0], b.direction[:, 1], np.full(n, 0.5)).clamp_(0.0, 1.0)
    blotch = noise.blotch.sample(grid, scene.textures.noise_scale * 0.5, scene.textures.noise_offset[:, ::-1])
    texture = per_image(b.blotch) * blotch + 1.0
    colour = [(per_image(b.colour1[:, c] - b.colour0[:, c]) * ramp + per_image(b.colour0[:, c])) * texture
              for c in range(3)]
    pixel = 2.0 / grid.res
    for k in range(len(BACKDROP_KINDS)):
        present = b.opacity[:, k] > 0
        reach = np.hypot(b.size[:, k, 0], b.size[:, k, 1])  # the box of the shape's bounding circle
        box = np.stack([b.centre[:, k, 0] - reach, b.centre[:, k, 0] + reach,
                        b.centre[:, k, 1] - reach, b.centre[:, k, 1] + reach], -1)
        region = Region.of(grid, np.where(present[:, None], box, np.nan))
        if region is None:
            continue
        distance, ex = _shape_distance(region.grid, b, k)
        alpha = (0.5 - distance * (1.0 / pixel)).clamp_(0.0, 1.0).mul_(per_image(b.opacity[:, k]))
        shade = None
        if k == len(BACKDROP_KINDS) - 1 and (b.stripes > 0).any():
            shade = (tri(ex * per_image(b.stripe_freq)) - 0.5).mul_(per_image(b.stripes)).add_(1.0)
        for c in range(3):
            part = region.take(colour[c])
            target = per_image(b.colour[:, k, c]) if shade is None else per_image(b.colour[:, k, c]) * shade
            region.put(colour[c], part.add_((target - part).mul_(alpha)))
    return colour


# ---------------------------------------------------------------------------------------------
# Assembly

def _keypoints(scene: HeadScene, depth2: np.ndarray, pid2: np.ndarray, size: int) -> np.ndarray:
    """Project the anchors: ``[N, K, 3]`` (x, y in output pixels, visible 0/1).

    A keypoint is visible when it lies inside the frame and the supersample that holds it
    sees the keypoint's own part (`KEYPOINT_PRIMS`) at the keypoint's depth (within
    ``visibility_tol``): hair, glasses, a hat, another part or the back of the head in front
    of it hide it. (Comparing the part as well as the depth keeps the test exact near
    silhouettes, where depth changes fast from sample to sample.)
    """
    anchors = scene.keypoints
    px = (anchors[..., 0] + 1.0) * (0.5 * size)
    py = (1.0 - anchors[..., 1]) * (0.5 * size)
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    res2 = 2 * size
    col = np.clip(np.floor(px * 2).astype(np.int64), 0, res2 - 1)
    row = np.clip(np.floor(py * 2).astype(np.int64), 0, res2 - 1)
    batch = np.arange(scene.n)[:, None]
    seen_pid, seen_depth = pid2[batch, row, col], depth2[batch, row, col]
    own = np.stack([np.isin(seen_pid[:, k], prims) for k, prims in enumerate(KEYPOINT_PRIMS)], 1)
    near = np.abs(seen_depth - anchors[..., 2]) <= scene.visibility_tol[:, None]
    visible = inside & own & near
    return np.stack([px, py, visible.astype(np.float64)], -1).astype(np.float32)


_MATERIAL_CLASS = torch.from_numpy(MATERIAL_CLASS.astype(np.int32))


def _render_block(scene: HeadScene, size: int, noise: _Noise, seed: int, first: int) -> LabeledBatch:
    """Render one block of images: see the module docstring for the steps."""
    grid2, grid1 = Grid.square(2 * size), Grid.square(size)
    depth2, pid, lens = _first_hits(grid2, scene)
    surface = _decals(grid2, scene, depth2, pid)
    foreground = _shade(grid2, scene, noise, depth2, pid, surface, lens)
    background = _backdrop(grid1, scene.backdrop, noise, scene)

    # Area antialiasing: foreground colours (0 on the background) and coverage averaged over
    # 2x2 samples, then composited over the background drawn at the output size.
    uncovered = 1.0 - pool_2x2(step(Prim.BACKGROUND - 0.5 - pid.float()))
    grain = noise.grain.sample(grid1, np.full(scene.n, float(size)), scene.textures.grain_offset)
    grain *= per_image(scene.grain)
    gain, offset = per_image(scene.contrast), per_image(0.5 + scene.brightness - 0.5 * scene.contrast)
    pixels = []
    for fg, bg in zip(foreground, background):
        value = (pool_2x2(fg) + uncovered * bg).mul_(gain).add_(offset).add_(grain)
        pixels.append(torch.floor(value.clamp_(0.0, 1.0).mul_(255.0).add_(0.5)).to(torch.uint8))

    classes = _MATERIAL_CLASS.index_select(0, surface.material.view(-1)).view(surface.material.shape)
    seg, depth = majority_2x2(classes, depth2)
    return LabeledBatch(
        images=torch.stack(pixels, -1).numpy(),
        seg=seg.to(torch.uint8).numpy(),
        depth=depth.numpy(),
        keypoints=_keypoints(scene, depth2.numpy(), pid.numpy(), size),
        names=[f"s{seed}_{i:08d}" for i in range(first, first + scene.n)],
    )
