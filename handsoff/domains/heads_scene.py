"""Random scene parameters of the 'heads' domain: one row per image, all numpy ``[N, ...]``.

Every image draws its numbers from its own generator seeded by ``(seed, index)``, into a
fixed table of uniforms (column ``j`` = the ``j``-th draw of every image), and everything
after that is vectorised over the batch.

Head-local frame (units of the head radius ``R``): ``x`` towards the subject's left (the
image right in a frontal view), ``y`` up, ``z`` out of the face towards the camera. A local
point ``p`` lies at ``centre + R * axes @ p`` in camera space (see `raster`).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from handsoff.domains.raster import Ellipsoid, Linear

__all__ = ["CLASSES", "KEYPOINT_NAMES", "KEYPOINT_PRIMS", "BACKDROP_KINDS", "Prim", "Mat", "Ch", "MATERIAL_CLASS",
           "Draws", "HeadScene", "sample_scene"]

CLASSES: tuple[str, ...] = ("background", "skin", "hair", "eye", "brow", "nose", "mouth", "ear",
                            "neck", "cloth", "accessory")
#: Left and right are the subject's own (anatomical) sides, as in face landmark sets.
KEYPOINT_NAMES: tuple[str, ...] = ("right_eye", "left_eye", "right_brow", "left_brow", "nose_tip",
                                   "mouth_right", "mouth_left", "chin", "right_ear", "left_ear")


class Prim(IntEnum):
    """Geometric primitives; the id of the first one hit is the sample's primitive id."""

    SKULL = 0  # skull and jaw first: `pid <= JAW` is the face test for decals
    JAW = 1
    NOSE = 2
    EAR_R = 3
    EAR_L = 4
    NECK = 5
    TORSO = 6
    HAIR = 7  # clipped shell
    HAIR_BACK = 8  # long hair falling behind the neck
    HAT = 9  # clipped shell
    BRIM = 10
    EARRING_R = 11
    EARRING_L = 12
    TEMPLE_R = 13
    TEMPLE_L = 14
    GLASSES = 15  # the frame, a plane with a mask
    BACKGROUND = 16


N_PRIMS = int(Prim.BACKGROUND) + 1


class Mat(IntEnum):
    """Surface materials: one per primitive (same id), then the face decals painted over skin."""

    # Decals are painted with a running maximum: a later (higher) id wins where two overlap.
    BROW = N_PRIMS
    SCLERA = N_PRIMS + 1
    IRIS = N_PRIMS + 2
    PUPIL = N_PRIMS + 3
    LINER = N_PRIMS + 4
    LIP_UPPER = N_PRIMS + 5
    LIP_LOWER = N_PRIMS + 6
    MOUTH_GAP = N_PRIMS + 7


N_MATS = int(Mat.MOUTH_GAP) + 1

_SKIN_PRIMS = (Prim.SKULL, Prim.JAW)
#: The primitives each keypoint lies on: it is visible only where one of them is seen.
KEYPOINT_PRIMS: tuple[tuple[Prim, ...], ...] = (
    _SKIN_PRIMS, _SKIN_PRIMS, _SKIN_PRIMS, _SKIN_PRIMS, (Prim.NOSE,), _SKIN_PRIMS, _SKIN_PRIMS, _SKIN_PRIMS,
    (Prim.EAR_R,), (Prim.EAR_L,))


class Ch(IntEnum):
    """Channels of the per-image material table."""

    R = 0
    G = 1
    B = 2
    GLOSS = 3  # specular strength; the Blinn exponent grows with it
    NOISE = 4  # amplitude of the noise texture (smooth blotches plus grain)


N_CH = int(Ch.NOISE) + 1


def _material_classes() -> np.ndarray:
    cls = {name: i for i, name in enumerate(CLASSES)}
    by_prim = {Prim.SKULL: "skin", Prim.JAW: "skin", Prim.NOSE: "nose", Prim.EAR_R: "ear",
               Prim.EAR_L: "ear", Prim.NECK: "neck", Prim.TORSO: "cloth", Prim.HAIR: "hair",
               Prim.HAIR_BACK: "hair", Prim.HAT: "accessory", Prim.BRIM: "accessory",
               Prim.EARRING_R: "accessory", Prim.EARRING_L: "accessory", Prim.TEMPLE_R: "accessory",
               Prim.TEMPLE_L: "accessory", Prim.GLASSES: "accessory", Prim.BACKGROUND: "background"}
    by_mat = {Mat.SCLERA: "eye", Mat.IRIS: "eye", Mat.PUPIL: "eye", Mat.LINER: "eye", Mat.BROW: "brow",
              Mat.LIP_UPPER: "mouth", Mat.LIP_LOWER: "mouth", Mat.MOUTH_GAP: "mouth"}
    table = np.zeros(N_MATS, dtype=np.uint8)
    for key, name in {**by_prim, **by_mat}.items():
        table[int(key)] = cls[name]
    return table


#: Class index of every material id.
MATERIAL_CLASS = _material_classes()


class Draws:
    """Per-image random numbers, consumed column by column.

    Row ``i`` comes from ``numpy.random.default_rng([seed, index_i])``, so an image's numbers
    depend on its own index only. Every call takes the next column(s) for all images at once.
    """

    def __init__(self, seed: int, indices: np.ndarray, columns: int = 384) -> None:
        self.table = np.stack([np.random.default_rng([seed, int(i)]).random(columns) for i in indices])
        self.n = len(indices)
        self._next = 0

    def _take(self, k: int) -> np.ndarray:
        if self._next + k > self.table.shape[1]:
            raise RuntimeError("Draws: out of columns; raise `columns`")
        cols = self.table[:, self._next:self._next + k]
        self._next += k
        return cols

    def uniform(self, lo: float, hi: float) -> np.ndarray:
        """``[N]`` uniform in ``[lo, hi)``."""
        return lo + (hi - lo) * self._take(1)[:, 0]

    def uniforms(self, lo: float, hi: float, k: int) -> np.ndarray:
        """``[N, k]`` uniform in ``[lo, hi)``."""
        return lo + (hi - lo) * self._take(k)

    def normal(self, mean: float, std: float, limit: float) -> np.ndarray:
        """``[N]`` normal (Box-Muller) clipped to ``mean +- limit``."""
        u1, u2 = self._take(2).T
        z = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
        return np.clip(mean + std * z, mean - limit, mean + limit)

    def chance(self, p: float) -> np.ndarray:
        """``[N]`` bool, true with probability ``p``."""
        return self._take(1)[:, 0] < p

    def choice(self, weights: list[float]) -> np.ndarray:
        """``[N]`` int index drawn with the given relative weights."""
        cum = np.cumsum(weights) / np.sum(weights)
        return np.minimum(np.searchsorted(cum, self._take(1)[:, 0], side="right"), len(weights) - 1)


# ---------------------------------------------------------------------------------------------
# Geometry helpers (numpy, [N] vectors)

def _rot_x(a: np.ndarray) -> np.ndarray:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def _rot_y(a: np.ndarray) -> np.ndarray:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _rot_z(a: np.ndarray) -> np.ndarray:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


#: Local frame (z towards the camera) -> camera frame (z away from it).
_TO_CAMERA = np.diag([1.0, 1.0, -1.0])


def _vec(*parts: np.ndarray | float, n: int) -> np.ndarray:
    """Stack scalars / ``[N]`` arrays into ``[N, len(parts)]``."""
    return np.stack([np.broadcast_to(np.asarray(p, dtype=np.float64), (n,)) for p in parts], -1)


@dataclass(frozen=True)
class Frame:
    """A scaled rigid frame: local ``p`` -> camera ``centre + scale * axes @ p``."""

    centre: np.ndarray  # [N, 3]
    axes: np.ndarray  # [N, 3, 3]
    scale: np.ndarray  # [N]

    def point(self, local: np.ndarray) -> np.ndarray:
        """Local ``[N, 3]`` or ``[N, K, 3]`` -> camera, same shape."""
        if local.ndim == 2:
            return self.centre + self.scale[:, None] * np.einsum("nij,nj->ni", self.axes, local)
        return self.centre[:, None] + self.scale[:, None, None] * np.einsum("nij,nkj->nki", self.axes, local)

    def ellipsoid(self, centre: np.ndarray, radii: np.ndarray, enabled: np.ndarray,
                  turn: np.ndarray | None = None) -> Ellipsoid:
        """An ellipsoid given in this frame (optionally turned by ``turn [N, 3, 3]``)."""
        axes = self.axes if turn is None else self.axes @ turn
        return Ellipsoid(self.point(centre), axes, self.scale[:, None] * radii, enabled)

    def local_coords(self) -> tuple[Linear, Linear, Linear]:
        """Fields mapping a camera point ``(u, v, t)`` to this frame's local ``x, y, z``."""
        inv = 1.0 / self.scale
        coords = []
        for k in range(3):
            col = self.axes[:, :, k]
            coords.append(Linear(col[:, 0] * inv, col[:, 1] * inv, col[:, 2] * inv,
                                 -np.einsum("ni,ni->n", col, self.centre) * inv))
        return coords[0], coords[1], coords[2]


def _unit_coords(local: tuple[Linear, Linear, Linear], centre: np.ndarray,
                 radii: np.ndarray) -> tuple[Linear, Linear, Linear]:
    """Fields to the unit-sphere coordinates of an axis-aligned local ellipsoid."""
    return tuple(local[k].affine(radii[:, k], centre[:, k]) for k in range(3))  # type: ignore[return-value]


def _surface_z(x: np.ndarray, y: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Front ``z`` of an axis-aligned local ellipsoid above local ``(x, y)`` (``-inf`` off it)."""
    inside = 1.0 - ((x - centre[..., 0]) / radii[..., 0]) ** 2 - ((y - centre[..., 1]) / radii[..., 1]) ** 2
    return np.where(inside > 0, centre[..., 2] + radii[..., 2] * np.sqrt(np.maximum(inside, 0)), -np.inf)


# ---------------------------------------------------------------------------------------------
# Colours

_SKIN = np.array([[0.98, 0.86, 0.77], [0.95, 0.78, 0.66], [0.88, 0.67, 0.53], [0.78, 0.55, 0.41],
                  [0.62, 0.41, 0.29], [0.45, 0.29, 0.2], [0.3, 0.19, 0.14]])
_HAIR = np.array([[0.05, 0.045, 0.04], [0.17, 0.1, 0.06], [0.34, 0.21, 0.12], [0.5, 0.22, 0.1],
                  [0.78, 0.63, 0.38], [0.92, 0.83, 0.6], [0.58, 0.57, 0.55], [0.86, 0.86, 0.84]])
_HAIR_WEIGHTS = [3.0, 3.0, 2.0, 1.0, 1.5, 0.5, 0.7, 0.3, 0.4]  # the last: dyed (random hue)
_IRIS = np.array([[0.22, 0.12, 0.06], [0.4, 0.24, 0.11], [0.48, 0.4, 0.18], [0.28, 0.48, 0.28],
                  [0.3, 0.5, 0.78], [0.5, 0.56, 0.62]])
_IRIS_WEIGHTS = [4.0, 3.0, 1.0, 1.0, 1.5, 0.7]


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all ``[N]`` in [0, 1]) -> RGB ``[N, 3]``."""
    k = np.stack([5.0, 3.0, 1.0])[None, :] + 6.0 * h[:, None]
    k = np.mod(k, 6.0)
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _skin_colour(d: Draws) -> np.ndarray:
    pos = d.uniform(0.0, len(_SKIN) - 1.0)
    i = np.minimum(pos.astype(int), len(_SKIN) - 2)
    frac = (pos - i)[:, None]
    base = _SKIN[i] * (1 - frac) + _SKIN[i + 1] * frac
    return np.clip(base * d.uniforms(0.96, 1.04, 3), 0, 1)


def _hair_colour(d: Draws) -> np.ndarray:
    kind = d.choice(_HAIR_WEIGHTS)
    dyed = _hsv(d.uniform(0, 1), d.uniform(0.5, 0.9), d.uniform(0.35, 0.8))
    base = np.where((kind == len(_HAIR))[:, None], dyed, _HAIR[np.minimum(kind, len(_HAIR) - 1)])
    return np.clip(base * d.uniform(0.85, 1.15)[:, None], 0, 1)


def _random_colour(d: Draws) -> np.ndarray:
    return _hsv(d.uniform(0, 1), d.uniform(0.0, 0.85), d.uniform(0.1, 0.95))


def _pick(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image choice between colours ``a`` and ``b`` ``[N, 3]``."""
    return np.where(mask[:, None], a, b)


# ---------------------------------------------------------------------------------------------
# The scene record

@dataclass(frozen=True)
class HairClip:
    """The part of the hair (or hat) shell that exists: ``qy > line(qx, qz)`` on its unit sphere.

    The line is ``y_side`` at the sides, blends to ``y_front (+ part*qx + fringe)`` where
    ``qz > front_cut`` (over the face) and to ``y_back`` where ``qz < -back_cut``.
    """

    y_front: np.ndarray
    y_side: np.ndarray
    y_back: np.ndarray
    front_cut: np.ndarray
    back_cut: np.ndarray
    part: np.ndarray
    fringe_amp: np.ndarray
    fringe_freq: np.ndarray
    fringe_phase: np.ndarray


@dataclass(frozen=True)
class FaceDecals:
    """Eyes, brows and lips painted on the skin, in head-local units (``[N]`` each).

    Eyes/brows are mirrored about ``x = 0``: the shapes are functions of ``|x|``.
    """

    eye_x: np.ndarray
    eye_y: np.ndarray
    eye_w: np.ndarray
    eye_h: np.ndarray
    iris_r: np.ndarray
    pupil_r: np.ndarray
    gaze_x: np.ndarray
    gaze_y: np.ndarray
    liner: np.ndarray  # upper-lid line: fraction of the eye's half-height from the top
    brow_x: np.ndarray
    brow_y: np.ndarray
    brow_w: np.ndarray
    brow_arch: np.ndarray
    brow_thick: np.ndarray
    brow_slant: np.ndarray
    mouth_y: np.ndarray
    mouth_w: np.ndarray
    lip_upper: np.ndarray
    lip_lower: np.ndarray
    smile: np.ndarray
    gap: np.ndarray
    socket: np.ndarray  # darkening of the eye sockets (fake ambient occlusion)


@dataclass(frozen=True)
class Glasses:
    """Glasses frame in the plane ``z_local = plane_z`` (``[N]`` each; lenses at ``+-lens_x``)."""

    enabled: np.ndarray
    plane_z: np.ndarray
    lens_x: np.ndarray
    lens_y: np.ndarray
    lens_w: np.ndarray
    lens_h: np.ndarray
    rim: np.ndarray  # inner/outer radius ratio squared of the rim ellipse
    bar_y: np.ndarray  # height of the bridge and end pieces
    bar_h: np.ndarray  # half thickness of the bridge and end pieces
    temple_x: np.ndarray  # where the end pieces meet the temples
    tint: np.ndarray  # [N, 3] lens transmission


@dataclass(frozen=True)
class Light:
    """One directional light plus ambient; vectors in camera space pointing to the light."""

    direction: np.ndarray  # [N, 3]
    half: np.ndarray  # [N, 3] Blinn half vector with the view direction (0, 0, -1)
    ambient: np.ndarray  # [N, 3]
    diffuse: np.ndarray  # [N, 3]
    specular: np.ndarray  # [N, 3]


@dataclass(frozen=True)
class Textures:
    """Per-image texture placement (texels across the frame, offsets in texels) and amplitudes."""

    grain_offset: np.ndarray  # [N, 2] film grain at the output size
    noise_scale: np.ndarray  # [N] surface noise
    noise_offset: np.ndarray  # [N, 2]
    strand_amp: np.ndarray  # [N] hair strands
    cloth_stripes: np.ndarray  # [N] stripes on the clothes (0: plain)
    hat_stripes: np.ndarray  # [N] stripes on the hat
    strand_freq: np.ndarray  # [N]
    stripe_u: np.ndarray  # [N] stripe phase per frame unit along u
    stripe_v: np.ndarray


#: Background shape slots: ellipse (0) or rectangle (1); the last one may be striped.
BACKDROP_KINDS = (0, 1, 0, 1)


@dataclass(frozen=True)
class Backdrop:
    """The cluttered background: a textured gradient with shapes on top (`BACKDROP_KINDS`).

    Shapes have soft one-pixel edges; their colours sometimes copy the skin or the hair.
    """

    colour0: np.ndarray  # [N, 3]
    colour1: np.ndarray  # [N, 3]
    direction: np.ndarray  # [N, 2] gradient direction (unit) / extent
    blotch: np.ndarray  # [N] texture amplitude
    centre: np.ndarray  # [N, K, 2]
    size: np.ndarray  # [N, K, 2] half extents
    angle: np.ndarray  # [N, K, 2] cos, sin
    colour: np.ndarray  # [N, K, 3]
    opacity: np.ndarray  # [N, K] (0: absent)
    stripes: np.ndarray  # [N] stripe amplitude of the last shape
    stripe_freq: np.ndarray  # [N] stripes per half extent


@dataclass(frozen=True)
class HeadScene:
    """Everything that a block of images needs, ``N`` rows each."""

    n: int
    head: Frame
    local: tuple[Linear, Linear, Linear]  # camera point -> head-local coordinates
    prims: tuple[Ellipsoid, ...]  # indexed by `Prim` (up to TEMPLE_L)
    hair_unit: tuple[Linear, Linear, Linear]
    hair_clip: HairClip
    hat_unit: tuple[Linear, Linear, Linear]
    hat_clip: HairClip
    glasses: Glasses
    face: FaceDecals
    materials: np.ndarray  # [N, N_MATS, N_CH]
    light: Light
    textures: Textures
    backdrop: Backdrop
    keypoints: np.ndarray  # [N, K, 3] camera-space anchors
    visibility_tol: np.ndarray  # [N] depth tolerance of the keypoint visibility test
    grain: np.ndarray  # [N] film grain amplitude
    contrast: np.ndarray  # [N]
    brightness: np.ndarray  # [N]


_DEG = np.pi / 180.0


@dataclass(frozen=True)
class _Head:
    """The head's parts in head-local units (``[N, 3]`` centres and radii; ears: the left one)."""

    skull_c: np.ndarray
    skull_r: np.ndarray
    jaw_c: np.ndarray
    jaw_r: np.ndarray
    nose_c: np.ndarray
    nose_r: np.ndarray
    ear_c: np.ndarray
    ear_r: np.ndarray
    ear_turn: np.ndarray  # [N, 3, 3] the left ear's flare; the right one is mirrored

    def skin_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Front ``z`` of the skin (skull or jaw) above local ``(x, y)``."""
        return np.maximum(_surface_z(x, y, self.skull_c, self.skull_r), _surface_z(x, y, self.jaw_c, self.jaw_r))


@dataclass(frozen=True)
class _Hair:
    """Hair shell and long-hair mass (head-local), the hat, and which images have what."""

    style: np.ndarray  # [N] 0 bald, 1 short, 2 long
    thick: np.ndarray
    shell_c: np.ndarray
    shell_r: np.ndarray
    clip: HairClip
    back_c: np.ndarray
    back_r: np.ndarray


def _mirrored(p: np.ndarray) -> np.ndarray:
    """Local points ``[..., 3]`` mirrored to the other side (x -> -x)."""
    return p * np.array([-1.0, 1.0, 1.0])


def _sample_pose(d: Draws) -> tuple[Frame, Frame, np.ndarray]:
    """Head and body frames (the head turns about the top of the neck) and the head's yaw."""
    n = d.n
    scale = d.uniform(0.46, 0.6)
    yaw = d.normal(0.0, 28.0, 75.0) * _DEG
    pitch = d.normal(0.0, 10.0, 28.0) * _DEG
    roll = d.normal(0.0, 8.0, 25.0) * _DEG
    head_axes = _TO_CAMERA @ _rot_z(roll) @ _rot_x(pitch) @ _rot_y(yaw)
    # The neck pivot sits 0.6 R below the head centre; the (frontal) head centre is near the middle.
    pivot = _vec(d.normal(0.0, 0.06, 0.15), d.normal(0.06, 0.05, 0.12) - 0.6 * scale, d.uniform(4.8, 5.2), n=n)
    head_centre = pivot - scale[:, None] * np.einsum("nij,j->ni", head_axes, np.array([0.0, -0.6, -0.2]))
    body_axes = _TO_CAMERA @ _rot_z(0.3 * roll + d.normal(0, 3.0, 8.0) * _DEG) \
        @ _rot_y(0.35 * yaw + d.normal(0.0, 10.0, 25.0) * _DEG)
    return Frame(head_centre, head_axes, scale), Frame(pivot, body_axes, scale), yaw


def _sample_head(d: Draws) -> _Head:
    n, zero = d.n, np.zeros(d.n)
    skull_r = np.stack([d.uniform(0.82, 0.94), d.uniform(0.98, 1.08), d.uniform(0.92, 1.02)], -1)
    jaw_c = _vec(zero, -d.uniform(0.32, 0.42), d.uniform(0.06, 0.14), n=n)
    jaw_r = np.stack([d.uniform(0.62, 0.76), d.uniform(0.56, 0.68), d.uniform(0.74, 0.84)], -1)
    head = _Head(np.zeros((n, 3)), skull_r, jaw_c, jaw_r, *(np.zeros((n, 3)),) * 4, np.zeros((n, 3, 3)))
    nose_y = d.uniform(-0.24, -0.12)
    nose_r = np.stack([d.uniform(0.08, 0.13), d.uniform(0.17, 0.26), d.uniform(0.13, 0.2)], -1)
    nose_c = _vec(zero, nose_y, head.skin_z(zero, nose_y) - nose_r[:, 2] + d.uniform(0.07, 0.14), n=n)
    ear_r = np.stack([d.uniform(0.06, 0.09), d.uniform(0.17, 0.25), d.uniform(0.1, 0.15)], -1)
    ear_y, ear_z = d.uniform(-0.14, -0.02), d.uniform(-0.14, 0.0)
    ear_x = skull_r[:, 0] * np.sqrt(1 - (ear_y / skull_r[:, 1]) ** 2 - (ear_z / skull_r[:, 2]) ** 2) \
        - d.uniform(0.0, 0.03)
    return _Head(head.skull_c, skull_r, jaw_c, jaw_r, nose_c, nose_r, _vec(ear_x, ear_y, ear_z, n=n), ear_r,
                 _rot_y(d.uniform(15.0, 35.0) * _DEG))


def _sample_hair(d: Draws, head: _Head) -> _Hair:
    """Bald, short (a cap above the ears) or long (down the sides, plus a mass behind the neck)."""
    n, zero = d.n, np.zeros(d.n)
    style = d.choice([0.05, 0.45, 0.5])
    bald, long_hair = style == 0, style == 2
    thick = d.uniform(0.07, 0.16)
    shell_c = _vec(zero, d.uniform(0.0, 0.07), -d.uniform(0.0, 0.05), n=n)
    shell_r = head.skull_r + thick[:, None] + _vec(zero, d.uniform(0.0, 0.05), zero, n=n)
    fringe = d.chance(0.35)
    clip = HairClip(
        y_front=np.where(bald, 9.0, d.uniform(0.22, 0.5)),
        y_side=np.where(long_hair, -1.2, d.uniform(0.08, 0.3)),
        y_back=np.where(long_hair, -1.2, d.uniform(-0.7, -0.35)),
        front_cut=np.where(long_hair, d.uniform(0.3, 0.55), d.uniform(0.45, 0.65)),
        back_cut=d.uniform(0.1, 0.4),
        part=d.uniform(-0.3, 0.3),
        fringe_amp=np.where(fringe, d.uniform(0.04, 0.14), 0.0),
        fringe_freq=d.uniform(3.0, 9.0),
        fringe_phase=d.uniform(0.0, 1.0),
    )
    back_c = _vec(zero, -d.uniform(0.55, 0.9), -d.uniform(0.42, 0.55), n=n)
    back_r = np.stack([shell_r[:, 0] * d.uniform(0.95, 1.15), d.uniform(0.9, 1.4), d.uniform(0.42, 0.55)], -1)
    return _Hair(style, thick, shell_c, shell_r, clip, back_c, back_r)


def _sample_hat(d: Draws, head: _Head, hair: _Hair) -> tuple[np.ndarray, np.ndarray, np.ndarray, HairClip,
                                                              np.ndarray, np.ndarray, np.ndarray]:
    """A crown (clipped shell over the hair) and maybe a brim: a visor or all round.

    Returns: enabled, crown centre and radii, crown clip, brim enabled, brim centre and radii.
    """
    n, zero = d.n, np.zeros(d.n)
    hat = d.chance(0.15)
    crown_c = hair.shell_c + _vec(zero, d.uniform(0.0, 0.05), zero, n=n)
    crown_r = np.where((hair.style == 0)[:, None], head.skull_r + 0.05, hair.shell_r) + d.uniform(0.03, 0.08)[:, None]
    line = d.uniform(-0.05, 0.35)
    brim, visor = d.chance(0.6) & hat, d.chance(0.6)
    tilt = np.where(brim, 0.0, d.uniform(-0.25, 0.25))
    clip = HairClip(line + tilt * 0.5, line, line - tilt * 0.5, zero, zero, zero, zero, zero + 1.0, zero)
    brim_c = _vec(zero, crown_c[:, 1] + line * crown_r[:, 1], np.where(visor, d.uniform(0.35, 0.6), 0.0), n=n)
    brim_w = np.where(visor, d.uniform(0.6, 0.8), d.uniform(1.35, 1.7))
    brim_r = _vec(brim_w, d.uniform(0.025, 0.04), np.where(visor, d.uniform(0.85, 1.05), brim_w), n=n)
    return hat, crown_c, crown_r, clip, brim, brim_c, brim_r


def _sample_face(d: Draws, yaw: np.ndarray) -> FaceDecals:
    eye_x, eye_y = d.uniform(0.27, 0.35), d.uniform(0.0, 0.09)
    eye_w, eye_h = d.uniform(0.12, 0.16), d.uniform(0.05, 0.075)
    return FaceDecals(
        eye_x=eye_x, eye_y=eye_y, eye_w=eye_w, eye_h=eye_h,
        iris_r=d.uniform(0.055, 0.07), pupil_r=d.uniform(0.02, 0.03),
        # Eyes tend to look at the camera: the gaze turns against the head's yaw.
        gaze_x=d.normal(0.0, 0.02, 0.04) - 0.04 * np.sin(yaw), gaze_y=d.normal(0.0, 0.01, 0.02),
        liner=d.uniform(0.5, 0.75),
        brow_x=eye_x + d.uniform(-0.01, 0.04), brow_y=eye_y + eye_h + d.uniform(0.06, 0.12),
        brow_w=eye_w * d.uniform(1.15, 1.5), brow_arch=d.uniform(0.0, 0.06),
        brow_thick=d.uniform(0.022, 0.045), brow_slant=d.uniform(-0.12, 0.12),
        mouth_y=d.uniform(-0.6, -0.48), mouth_w=d.uniform(0.17, 0.25), lip_upper=d.uniform(0.025, 0.045),
        lip_lower=d.uniform(0.03, 0.06), smile=d.uniform(-0.02, 0.06), gap=d.uniform(0.005, 0.012),
        socket=d.uniform(0.1, 0.3),
    )


def _sample_glasses(d: Draws, head: _Head, hair: _Hair,
                    face: FaceDecals) -> tuple[Glasses, np.ndarray, np.ndarray]:
    """A frame in a plane in front of the eyes; returns it and the left temple's centre and radii."""
    n = d.n
    lens_y = face.eye_y - d.uniform(0.0, 0.03)
    plane_z = head.skin_z(face.eye_x, face.eye_y) + d.uniform(0.1, 0.17)
    lens_h = d.uniform(0.09, 0.14)
    lens_w = np.maximum(d.uniform(0.15, 0.2), face.eye_w * 1.15)
    lens_x = np.maximum(face.eye_x * d.uniform(0.98, 1.06), lens_w + 0.07)
    rim = d.uniform(0.025, 0.05)
    # Temples run along the side of the head (over short hair) back to the ears.
    temple_x = head.skull_r[:, 0] * np.sqrt(np.maximum(1 - (lens_y / head.skull_r[:, 1]) ** 2, 0.0)) + 0.03
    temple_x = np.where(hair.style == 1, temple_x + 0.5 * hair.thick, temple_x)
    glasses = Glasses(
        enabled=d.chance(0.25), plane_z=plane_z, lens_x=lens_x, lens_y=lens_y, lens_w=lens_w, lens_h=lens_h,
        rim=(1 - rim / lens_h) ** 2, bar_y=lens_y + lens_h * d.uniform(0.2, 0.5), bar_h=rim * 0.6,
        temple_x=temple_x,
        tint=np.clip(_pick(d.chance(0.25), _random_colour(d) * 0.5 + 0.5, np.full((n, 3), 0.92)), 0, 1),
    )
    half_length = 0.5 * (plane_z - head.ear_c[:, 2])
    temple_c = np.stack([temple_x, glasses.bar_y, plane_z - half_length], -1)
    return glasses, temple_c, _vec(rim * 0.45, rim * 0.45, half_length, n=n)


def _sample_materials(d: Draws, skin: np.ndarray, hair: np.ndarray) -> np.ndarray:
    """The material table ``[N, N_MATS, N_CH]``: colours, gloss and texture amplitude."""
    n = d.n
    mats = np.zeros((n, N_MATS, N_CH))

    def paint(ids: list[int], rgb: np.ndarray, gloss: np.ndarray | float, noise: np.ndarray | float = 0.0) -> None:
        for i in ids:
            mats[:, i, :3], mats[:, i, Ch.GLOSS], mats[:, i, Ch.NOISE] = rgb, gloss, noise

    def const(rgb: list[float]) -> np.ndarray:
        return np.broadcast_to(np.array(rgb), (n, 3))

    skin_gloss, skin_noise = d.uniform(0.06, 0.22), d.uniform(0.04, 0.12)
    paint([Prim.SKULL, Prim.JAW], skin, skin_gloss, skin_noise)
    paint([Prim.NOSE], skin * d.uniform(0.97, 1.04)[:, None], skin_gloss * 1.3, skin_noise)
    paint([Prim.EAR_R, Prim.EAR_L], skin * np.array([0.97, 0.93, 0.92]), skin_gloss, skin_noise)
    paint([Prim.NECK], skin * d.uniform(0.8, 0.92)[:, None], skin_gloss * 0.7, skin_noise)
    paint([Prim.TORSO], _random_colour(d), 0.04, d.uniform(0.05, 0.2))
    paint([Prim.HAIR, Prim.HAIR_BACK], hair, d.uniform(0.08, 0.3), 0.12)
    paint([Prim.HAT, Prim.BRIM], _random_colour(d), 0.08, 0.1)
    paint([Prim.EARRING_R, Prim.EARRING_L], _pick(d.chance(0.5), const([0.85, 0.66, 0.28]), const([0.78, 0.78, 0.8])),
          0.9)
    kind = d.choice([3.0, 1.5, 1.0, 1.0])[:, None]  # black, tortoise, metal, colour
    fixed = [const([0.05, 0.05, 0.06]), const([0.3, 0.17, 0.08]), const([0.7, 0.68, 0.62])]
    frame = np.select([kind == 0, kind == 1, kind == 2], fixed, _random_colour(d))
    paint([Prim.GLASSES, Prim.TEMPLE_R, Prim.TEMPLE_L], frame, 0.6, 0.03)
    paint([Mat.SCLERA], np.array([0.93, 0.9, 0.87]) * d.uniform(0.8, 0.95)[:, None], 0.5)
    paint([Mat.IRIS], _IRIS[d.choice(_IRIS_WEIGHTS)] * d.uniform(0.8, 1.15)[:, None], 0.6, 0.15)
    paint([Mat.PUPIL], const([0.03, 0.03, 0.03]), 0.8)
    paint([Mat.LINER], np.minimum(hair, 0.12) * 0.6 + 0.02, 0.2)
    paint([Mat.BROW], np.minimum(hair * d.uniform(0.6, 0.85)[:, None], skin * 0.55), 0.05, 0.2)
    lipstick = _hsv(d.uniform(0.92, 1.02) % 1.0, d.uniform(0.5, 0.85), d.uniform(0.45, 0.8))
    lip = _pick(d.chance(0.15), lipstick, skin * np.array([0.9, 0.6, 0.6]) * d.uniform(0.85, 1.0)[:, None])
    paint([Mat.LIP_UPPER], lip * 0.92, 0.35, 0.05)
    paint([Mat.LIP_LOWER], lip, 0.45, 0.05)
    paint([Mat.MOUTH_GAP], np.array([0.22, 0.07, 0.07]) * (0.5 + 0.5 * skin), 0.1)
    return mats


def _sample_light(d: Draws) -> Light:
    """A directional light from the front half-space, warm or cool, plus ambient."""
    az, el = d.uniform(-70.0, 70.0) * _DEG, d.uniform(-10.0, 60.0) * _DEG
    direction = np.stack([np.sin(az) * np.cos(el), np.sin(el), -np.cos(az) * np.cos(el)], -1)
    half = direction + np.array([0.0, 0.0, -1.0])
    half /= np.linalg.norm(half, axis=-1, keepdims=True)
    warm = d.uniform(-0.12, 0.12)[:, None] * np.array([1.0, 0.0, -1.0]) + 1.0
    return Light(direction, half, ambient=d.uniform(0.25, 0.5)[:, None] * (2.0 - warm),
                 diffuse=d.uniform(0.55, 0.9)[:, None] * warm, specular=d.uniform(0.5, 1.0)[:, None] * warm)


def _sample_textures(d: Draws) -> Textures:
    stripe_angle, stripe_freq = d.uniform(0.0, np.pi), d.uniform(4.0, 14.0)
    return Textures(
        grain_offset=d.uniforms(0.0, 512.0, 2), noise_scale=d.uniform(250.0, 512.0),
        noise_offset=d.uniforms(0.0, 512.0, 2), strand_freq=d.uniform(9.0, 22.0),
        strand_amp=d.uniform(0.15, 0.45), cloth_stripes=np.where(d.chance(0.35), d.uniform(0.15, 0.5), 0.0),
        hat_stripes=np.where(d.chance(0.3), 0.35, 0.0),
        stripe_u=np.cos(stripe_angle) * stripe_freq, stripe_v=np.sin(stripe_angle) * stripe_freq)


def _anchors(head: _Head, face: FaceDecals) -> np.ndarray:
    """Keypoint anchors in head-local coordinates ``[N, K, 3]``, in `KEYPOINT_NAMES` order."""
    n = len(face.eye_x)

    def on_skin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _vec(x, y, head.skin_z(x, y), n=n)

    ex, ey, bx, by = face.eye_x, face.eye_y, face.brow_x, face.brow_y + face.brow_arch
    mx, my = face.mouth_w * 0.93, face.mouth_y + face.smile * 0.93**2
    # The left ear's outer face, turned forward by its flare; the right ear mirrors it.
    ear = head.ear_c + np.einsum("nij,nj->ni", head.ear_turn, head.ear_r * np.array([0.8, 0.0, 0.6]))
    return np.stack([
        on_skin(-ex, ey), on_skin(ex, ey), on_skin(-bx, by), on_skin(bx, by),
        head.nose_c + head.nose_r * np.array([0.0, -0.15, 0.99]),
        on_skin(-mx, my), on_skin(mx, my),
        head.jaw_c + head.jaw_r * np.array([0.0, -0.8, 0.6]),
        _mirrored(ear), ear,
    ], 1)


def sample_scene(seed: int, indices: np.ndarray) -> HeadScene:
    """Draw the scenes of images ``indices`` of sequence ``seed``."""
    d = Draws(seed, indices)
    n, zero = d.n, np.zeros(d.n)
    head_frame, body, yaw = _sample_pose(d)
    head = _sample_head(d)
    hair = _sample_hair(d, head)
    hat, crown_c, crown_r, hat_clip, brim, brim_c, brim_r = _sample_hat(d, head, hair)
    face = _sample_face(d, yaw)
    glasses, temple_c, temple_r = _sample_glasses(d, head, hair, face)
    earrings, ring_r = d.chance(0.2), d.uniform(0.035, 0.06)
    ring_c = head.ear_c + np.einsum("nij,nj->ni", head.ear_turn, _vec(zero, -(head.ear_r[:, 1] + ring_r * 0.6),
                                                                         zero, n=n))
    ring = _vec(ring_r, ring_r, ring_r, n=n)
    on = np.ones(n, dtype=bool)
    mirror = np.diag([-1.0, 1.0, 1.0])  # the right ear's flare is the left one's, reflected
    prims = (  # in `Prim` order
        head_frame.ellipsoid(head.skull_c, head.skull_r, on),
        head_frame.ellipsoid(head.jaw_c, head.jaw_r, on),
        head_frame.ellipsoid(head.nose_c, head.nose_r, on),
        head_frame.ellipsoid(_mirrored(head.ear_c), head.ear_r, on, mirror @ head.ear_turn @ mirror),
        head_frame.ellipsoid(head.ear_c, head.ear_r, on, head.ear_turn),
        body.ellipsoid(_vec(zero, -0.5, zero, n=n), _vec(d.uniform(0.36, 0.46), 0.8, d.uniform(0.36, 0.44), n=n), on),
        body.ellipsoid(_vec(zero, -1.45 - d.uniform(0.0, 0.2), -d.uniform(0.05, 0.2), n=n),
                       _vec(d.uniform(1.9, 2.5), d.uniform(0.8, 0.95), d.uniform(0.62, 0.8), n=n), on),
        head_frame.ellipsoid(hair.shell_c, hair.shell_r, hair.style > 0),
        head_frame.ellipsoid(hair.back_c, hair.back_r, hair.style == 2),
        head_frame.ellipsoid(crown_c, crown_r, hat),
        head_frame.ellipsoid(brim_c, brim_r, brim),
        head_frame.ellipsoid(_mirrored(ring_c), ring, earrings),
        head_frame.ellipsoid(ring_c, ring, earrings),
        head_frame.ellipsoid(_mirrored(temple_c), temple_r, glasses.enabled),
        head_frame.ellipsoid(temple_c, temple_r, glasses.enabled),
    )
    local = head_frame.local_coords()
    skin, hair_colour = _skin_colour(d), _hair_colour(d)
    return HeadScene(
        n=n, head=head_frame, local=local, prims=prims,
        hair_unit=_unit_coords(local, hair.shell_c, hair.shell_r), hair_clip=hair.clip,
        hat_unit=_unit_coords(local, crown_c, crown_r), hat_clip=hat_clip,
        glasses=glasses, face=face, materials=_sample_materials(d, skin, hair_colour), light=_sample_light(d),
        textures=_sample_textures(d), backdrop=_sample_backdrop(d, skin, hair_colour),
        keypoints=head_frame.point(_anchors(head, face)), visibility_tol=0.1 * head_frame.scale,
        grain=d.uniform(0.0, 0.03), contrast=d.uniform(0.85, 1.1), brightness=d.uniform(-0.05, 0.05),
    )


def _sample_backdrop(d: Draws, skin: np.ndarray, hair: np.ndarray) -> Backdrop:
    """Background: sometimes in the colours of the skin or hair, so that they are confusable."""

    def colour() -> np.ndarray:
        look_alike = d.choice([6.0, 1.5, 1.0])  # random, skin-like, hair-like
        near = np.where((look_alike == 1)[:, None], skin, hair) * d.uniforms(0.85, 1.15, 3)
        return np.clip(np.where((look_alike == 0)[:, None], _random_colour(d), near), 0, 1)

    angle = d.uniform(0.0, 2 * np.pi)
    extent = d.uniform(0.3, 1.5)
    c0, c1 = colour(), colour()
    centres, sizes, angles, colours, opacity = [], [], [], [], []
    for _ in BACKDROP_KINDS:
        centres.append(d.uniforms(-1.2, 1.2, 2))
        sizes.append(d.uniforms(0.08, 0.7, 2))
        a = d.uniform(0.0, np.pi)
        angles.append(np.stack([np.cos(a), np.sin(a)], -1))
        colours.append(colour())
        opacity.append(np.where(d.chance(0.85), d.uniform(0.5, 1.0), 0.0))
    return Backdrop(
        colour0=c0, colour1=c1,
        direction=np.stack([np.cos(angle), np.sin(angle)], -1) / extent[:, None],
        blotch=d.uniform(0.0, 0.25), centre=np.stack(centres, 1), size=np.stack(sizes, 1),
        angle=np.stack(angles, 1), colour=np.stack(colours, 1), opacity=np.stack(opacity, -1),
        stripes=np.where(d.chance(0.6), d.uniform(0.1, 0.4), 0.0), stripe_freq=d.uniform(2.0, 8.0),
    )
