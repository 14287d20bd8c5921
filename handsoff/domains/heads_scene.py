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

__all__ = ["CLASSES", "KEYPOINT_NAMES", "Prim", "Mat", "Ch", "MATERIAL_CLASS", "Draws", "HeadScene",
           "sample_scene"]

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


class Ch(IntEnum):
    """Channels of the per-image material table."""

    R = 0
    G = 1
    B = 2
    SPEC = 3  # specular strength
    SHINE = 4  # Blinn exponent (Schlick's rational approximation of x**m)
    WRAP = 5  # wrap-around diffuse: soft light bleeding past the terminator (skin)
    GRAIN = 6  # amplitude of fine noise
    STRAND = 7  # amplitude of the hair strand pattern
    STRIPE = 8  # amplitude of the cloth stripe pattern
    BLOTCH = 9  # amplitude of smooth, low-frequency noise


N_CH = int(Ch.BLOTCH) + 1


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
    """Per-image texture placement (texels across the frame, offsets in texels)."""

    grain_offset: np.ndarray  # [N, 2]
    blotch_scale: np.ndarray  # [N]
    blotch_offset: np.ndarray  # [N, 2]
    strand_freq: np.ndarray  # [N]
    stripe_u: np.ndarray  # [N] stripe phase per frame unit along u
    stripe_v: np.ndarray


@dataclass(frozen=True)
class Backdrop:
    """The cluttered background: a gradient, textured, with ``K`` shapes on top.

    Shapes are ellipses (``kind 0``) or rectangles (``kind 1``) with soft one-pixel edges.
    """

    colour0: np.ndarray  # [N, 3]
    colour1: np.ndarray  # [N, 3]
    direction: np.ndarray  # [N, 2] gradient direction (unit) / extent
    blotch: np.ndarray  # [N] texture amplitude
    kind: np.ndarray  # [N, K] 0 ellipse, 1 rectangle
    centre: np.ndarray  # [N, K, 2]
    size: np.ndarray  # [N, K, 2] half extents
    angle: np.ndarray  # [N, K, 2] cos, sin
    colour: np.ndarray  # [N, K, 3]
    opacity: np.ndarray  # [N, K]
    stripes: np.ndarray  # [N, K] stripe amplitude
    stripe_freq: np.ndarray  # [N, K]


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
    visibility_tol: np.ndarray  # [N] depth tolerance of the keypoint occlusion test
    grain: np.ndarray  # [N] film grain amplitude
    contrast: np.ndarray  # [N]
    brightness: np.ndarray  # [N]


def sample_scene(seed: int, indices: np.ndarray) -> HeadScene:
    """Draw the scenes of images ``indices`` of sequence ``seed``."""
    d = Draws(seed, indices)
    n = d.n
    zero, one = np.zeros(n), np.ones(n)
    deg = np.pi / 180.0

    # --- pose and placement
    scale = d.uniform(0.46, 0.6)
    yaw = d.normal(0.0, 28.0, 75.0) * deg
    pitch = d.normal(0.0, 10.0, 28.0) * deg
    roll = d.normal(0.0, 8.0, 25.0) * deg
    head_axes = _TO_CAMERA @ _rot_z(roll) @ _rot_x(pitch) @ _rot_y(yaw)
    pivot_local = _vec(0.0, -0.6, -0.2, n=n)
    # The neck pivot sits 0.6 R below the head centre; place the (frontal) head centre near the middle.
    pivot = _vec(d.normal(0.0, 0.06, 0.15), d.normal(0.06, 0.05, 0.12) - 0.6 * scale, d.uniform(4.8, 5.2), n=n)
    head_centre = pivot - scale[:, None] * np.einsum("nij,nj->ni", head_axes, pivot_local)
    head = Frame(head_centre, head_axes, scale)
    body_axes = _TO_CAMERA @ _rot_z(0.3 * roll + d.normal(0, 3.0, 8.0) * deg) \
        @ _rot_y(0.35 * yaw + d.normal(0.0, 10.0, 25.0) * deg)
    body = Frame(pivot, body_axes, scale)

    # --- head shape (local units)
    skull_r = np.stack([d.uniform(0.82, 0.94), d.uniform(0.98, 1.08), d.uniform(0.92, 1.02)], -1)
    skull_c = np.zeros((n, 3))
    jaw_c = _vec(zero, -d.uniform(0.32, 0.42), d.uniform(0.06, 0.14), n=n)
    jaw_r = np.stack([d.uniform(0.62, 0.76), d.uniform(0.56, 0.68), d.uniform(0.74, 0.84)], -1)

    def skin_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.maximum(_surface_z(x, y, skull_c, skull_r), _surface_z(x, y, jaw_c, jaw_r))

    nose_y = d.uniform(-0.24, -0.12)
    nose_r = np.stack([d.uniform(0.08, 0.13), d.uniform(0.17, 0.26), d.uniform(0.13, 0.2)], -1)
    nose_c = _vec(zero, nose_y, skin_z(zero, nose_y) - nose_r[:, 2] + d.uniform(0.07, 0.14), n=n)

    ear_r = np.stack([d.uniform(0.06, 0.09), d.uniform(0.17, 0.25), d.uniform(0.1, 0.15)], -1)
    ear_y, ear_z = d.uniform(-0.14, -0.02), d.uniform(-0.14, 0.0)
    ear_x = skull_r[:, 0] * np.sqrt(1 - (ear_y / skull_r[:, 1]) ** 2 - (ear_z / skull_r[:, 2]) ** 2) \
        - d.uniform(0.0, 0.03)
    flare = d.uniform(15.0, 35.0) * deg

    # --- hair
    style = d.choice([0.05, 0.45, 0.5])  # bald, short, long
    bald, long_hair = style == 0, style == 2
    thick = d.uniform(0.07, 0.16)
    hair_c = _vec(zero, d.uniform(0.0, 0.07), -d.uniform(0.0, 0.05), n=n)
    hair_r = skull_r + thick[:, None] + _vec(zero, d.uniform(0.0, 0.05), zero, n=n)
    fringe = d.chance(0.35)
    hair_clip = HairClip(
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
    back_r = np.stack([hair_r[:, 0] * d.uniform(0.95, 1.15), d.uniform(0.9, 1.4), d.uniform(0.42, 0.55)], -1)

    # --- accessories
    hat = d.chance(0.15)
    hat_c = hair_c + _vec(zero, d.uniform(0.0, 0.05), zero, n=n)
    hat_r = np.where(bald[:, None], skull_r + 0.05, hair_r) + d.uniform(0.03, 0.08)[:, None]
    hat_line = d.uniform(-0.05, 0.35)
    has_brim, visor = d.chance(0.6) & hat, d.chance(0.6)
    hat_tilt = np.where(has_brim, 0.0, d.uniform(-0.25, 0.25))
    hat_clip = HairClip(hat_line + hat_tilt * 0.5, hat_line, hat_line - hat_tilt * 0.5, zero, zero,
                        zero, zero, one, zero)
    brim_y = hat_c[:, 1] + hat_line * hat_r[:, 1]
    brim_c = _vec(zero, brim_y, np.where(visor, d.uniform(0.35, 0.6), 0.0), n=n)
    brim_w = np.where(visor, d.uniform(0.6, 0.8), d.uniform(1.35, 1.7))
    brim_r = _vec(brim_w, d.uniform(0.025, 0.04), np.where(visor, d.uniform(0.85, 1.05), brim_w), n=n)

    face = FaceDecals(
        eye_x=d.uniform(0.27, 0.35), eye_y=d.uniform(0.0, 0.09), eye_w=d.uniform(0.12, 0.16),
        eye_h=d.uniform(0.05, 0.075), iris_r=d.uniform(0.055, 0.07), pupil_r=d.uniform(0.02, 0.03),
        gaze_x=d.normal(0.0, 0.02, 0.04) - 0.04 * np.sin(yaw), gaze_y=d.normal(0.0, 0.01, 0.02),
        liner=d.uniform(0.5, 0.75),
        brow_x=zero, brow_y=zero, brow_w=zero, brow_arch=d.uniform(0.0, 0.06),
        brow_thick=d.uniform(0.022, 0.045), brow_slant=d.uniform(-0.12, 0.12),
        mouth_y=d.uniform(-0.6, -0.48), mouth_w=d.uniform(0.17, 0.25), lip_upper=d.uniform(0.025, 0.045),
        lip_lower=d.uniform(0.03, 0.06), smile=d.uniform(-0.02, 0.06), gap=d.uniform(0.005, 0.012),
        socket=d.uniform(0.1, 0.3),
    )
    face = FaceDecals(**{**face.__dict__,
                         "brow_x": face.eye_x + d.uniform(-0.01, 0.04),
                         "brow_y": face.eye_y + face.eye_h + d.uniform(0.06, 0.12),
                         "brow_w": face.eye_w * d.uniform(1.15, 1.5)})

    has_glasses = d.chance(0.25)
    lens_y = face.eye_y - d.uniform(0.0, 0.03)
    plane_z = skin_z(face.eye_x, face.eye_y) + d.uniform(0.1, 0.17)
    lens_h = d.uniform(0.09, 0.14)
    lens_w = np.maximum(d.uniform(0.15, 0.2), face.eye_w * 1.15)
    lens_x = np.maximum(face.eye_x * d.uniform(0.98, 1.06), lens_w + 0.07)
    rim_t = d.uniform(0.025, 0.05)
    temple_x = skull_r[:, 0] * np.sqrt(np.maximum(1 - (lens_y / skull_r[:, 1]) ** 2, 0.0)) + 0.03
    temple_x = np.where(bald | long_hair, temple_x, temple_x + 0.5 * thick)
    glasses = Glasses(
        enabled=has_glasses, plane_z=plane_z, lens_x=lens_x, lens_y=lens_y, lens_w=lens_w, lens_h=lens_h,
        rim=((1 - rim_t / lens_h) ** 2), bar_y=lens_y + lens_h * d.uniform(0.2, 0.5), bar_h=rim_t * 0.6,
        temple_x=temple_x,
        tint=np.clip(_pick(d.chance(0.25), _random_colour(d) * 0.5 + 0.5, one[:, None] * 0.92), 0, 1),
    )
    temple_len = 0.5 * (plane_z - ear_z)
    temple_c = np.stack([temple_x, glasses.bar_y, plane_z - temple_len], -1)
    temple_r = _vec(rim_t * 0.45, rim_t * 0.45, temple_len, n=n)

    earrings = d.chance(0.2)
    ear_turn_r, ear_turn_l = _rot_y(-flare), _rot_y(flare)
    ring_r = d.uniform(0.035, 0.06)
    ring_drop = _vec(zero, -(ear_r[:, 1] + ring_r * 0.6), zero, n=n)

    def mirrored(p: np.ndarray, side: float) -> np.ndarray:
        return p * np.array([side, 1.0, 1.0])

    ear_c = _vec(ear_x, ear_y, ear_z, n=n)
    ring_c_l = ear_c + np.einsum("nij,nj->ni", ear_turn_l, ring_drop)

    on = np.ones(n, dtype=bool)
    prims = (
        head.ellipsoid(skull_c, skull_r, on),
        head.ellipsoid(jaw_c, jaw_r, on),
        head.ellipsoid(nose_c, nose_r, on),
        head.ellipsoid(mirrored(ear_c, -1), ear_r, on, ear_turn_r),
        head.ellipsoid(ear_c, ear_r, on, ear_turn_l),
        body.ellipsoid(_vec(zero, -0.5, zero, n=n), _vec(d.uniform(0.36, 0.46), 0.8 + zero,
                                                          d.uniform(0.36, 0.44), n=n), on),
        body.ellipsoid(_vec(zero, -1.45 - d.uniform(0.0, 0.2), -d.uniform(0.05, 0.2), n=n),
                       _vec(d.uniform(1.9, 2.5), d.uniform(0.8, 0.95), d.uniform(0.62, 0.8), n=n), on),
        head.ellipsoid(hair_c, hair_r, ~bald),
        head.ellipsoid(back_c, back_r, long_hair),
        head.ellipsoid(hat_c, hat_r, hat),
        head.ellipsoid(brim_c, brim_r, has_brim),
        head.ellipsoid(mirrored(ring_c_l, -1), _vec(ring_r, ring_r, ring_r, n=n), earrings),
        head.ellipsoid(ring_c_l, _vec(ring_r, ring_r, ring_r, n=n), earrings),
        head.ellipsoid(mirrored(temple_c, -1), temple_r, has_glasses),
        head.ellipsoid(temple_c, temple_r, has_glasses),
    )
    local = head.local_coords()

    # --- materials
    skin = _skin_colour(d)
    hair_col = _hair_colour(d)
    mats = np.zeros((n, N_MATS, N_CH))

    def paint(ids: list[int], rgb: np.ndarray, spec: np.ndarray | float, shine: np.ndarray | float,
              wrap: float = 0.1, grain: float = 0.0, strand: float = 0.0, stripe: np.ndarray | float = 0.0,
              blotch: float = 0.0) -> None:
        for i in ids:
            mats[:, i, :3] = rgb
            mats[:, i, Ch.SPEC], mats[:, i, Ch.SHINE], mats[:, i, Ch.WRAP] = spec, shine, wrap
            mats[:, i, Ch.GRAIN], mats[:, i, Ch.STRAND] = grain, strand
            mats[:, i, Ch.STRIPE], mats[:, i, Ch.BLOTCH] = stripe, blotch

    skin_spec, skin_shine = d.uniform(0.06, 0.22), d.uniform(8.0, 30.0)
    paint([Prim.SKULL, Prim.JAW], skin, skin_spec, skin_shine, wrap=0.35, grain=0.03, blotch=0.08)
    paint([Prim.NOSE], skin * d.uniform(0.97, 1.04)[:, None], skin_spec * 1.3, skin_shine, 0.35, 0.03, blotch=0.08)
    paint([Prim.EAR_R, Prim.EAR_L], skin * np.array([0.97, 0.93, 0.92]), skin_spec, skin_shine, 0.35, 0.03)
    paint([Prim.NECK], skin * d.uniform(0.8, 0.92)[:, None], skin_spec * 0.7, skin_shine, 0.35, 0.03, blotch=0.06)
    cloth = _random_colour(d)
    paint([Prim.TORSO], cloth, 0.04, 6.0, 0.15, grain=0.05,
          stripe=np.where(d.chance(0.35), d.uniform(0.15, 0.5), 0.0), blotch=0.1)
    hair_spec = d.uniform(0.08, 0.3)
    paint([Prim.HAIR, Prim.HAIR_BACK], hair_col, hair_spec, d.uniform(10.0, 30.0), 0.1, grain=0.08,
          strand=d.uniform(0.15, 0.45), blotch=0.1)
    hat_col = _random_colour(d)
    paint([Prim.HAT, Prim.BRIM], hat_col, 0.08, 10.0, 0.1, grain=0.06,
          stripe=np.where(d.chance(0.3), 0.35, 0.0), blotch=0.05)
    metal = _pick(d.chance(0.5), np.array([0.85, 0.66, 0.28]) + zero[:, None], np.array([0.78, 0.78, 0.8]) + zero[:, None])
    paint([Prim.EARRING_R, Prim.EARRING_L], metal, 0.9, 60.0)
    frame_kind = d.choice([3.0, 1.5, 1.0, 1.0])  # black, tortoise, metal, colour
    frame_col = np.select([frame_kind[:, None] == 0, frame_kind[:, None] == 1, frame_kind[:, None] == 2],
                          [np.array([0.05, 0.05, 0.06]) + zero[:, None], np.array([0.3, 0.17, 0.08]) + zero[:, None],
                           np.array([0.7, 0.68, 0.62]) + zero[:, None]], _random_colour(d))
    paint([Prim.GLASSES, Prim.TEMPLE_R, Prim.TEMPLE_L], frame_col, 0.6, 40.0, grain=0.02)
    paint([Mat.SCLERA], np.array([0.93, 0.9, 0.87]) * d.uniform(0.8, 0.95)[:, None], 0.5, 50.0)
    iris = _IRIS[d.choice(_IRIS_WEIGHTS)] * d.uniform(0.8, 1.15)[:, None]
    paint([Mat.IRIS], iris, 0.6, 60.0, grain=0.1)
    paint([Mat.PUPIL], np.array([0.03, 0.03, 0.03]) + zero[:, None], 0.8, 60.0)
    paint([Mat.LINER], np.minimum(hair_col, 0.12) * 0.6 + 0.02, 0.2, 20.0)
    brow_col = np.minimum(hair_col * d.uniform(0.6, 0.85)[:, None], skin * 0.55)
    paint([Mat.BROW], brow_col, 0.05, 10.0, grain=0.15)
    lipstick = d.chance(0.15)
    lip = _pick(lipstick, _hsv(d.uniform(0.92, 1.02) % 1.0, d.uniform(0.5, 0.85), d.uniform(0.45, 0.8)),
                skin * np.array([0.9, 0.6, 0.6]) * d.uniform(0.85, 1.0)[:, None])
    paint([Mat.LIP_UPPER], lip * 0.92, 0.35, 25.0, 0.3, grain=0.04)
    paint([Mat.LIP_LOWER], lip, 0.45, 25.0, 0.3, grain=0.04)
    paint([Mat.MOUTH_GAP], np.array([0.22, 0.07, 0.07]) * (0.5 + 0.5 * skin), 0.1, 10.0)
    mats[:, :, Ch.SHINE] = np.maximum(mats[:, :, Ch.SHINE], 1.0)

    # --- light
    az, el = d.uniform(-70.0, 70.0) * deg, d.uniform(-10.0, 60.0) * deg
    direction = np.stack([np.sin(az) * np.cos(el), np.sin(el), -np.cos(az) * np.cos(el)], -1)
    half = direction + np.array([0.0, 0.0, -1.0])
    half /= np.linalg.norm(half, axis=-1, keepdims=True)
    warm = d.uniform(-0.12, 0.12)[:, None] * np.array([1.0, 0.0, -1.0]) + 1.0
    light = Light(direction, half, ambient=d.uniform(0.25, 0.5)[:, None] * (2.0 - warm),
                  diffuse=d.uniform(0.55, 0.9)[:, None] * warm, specular=d.uniform(0.5, 1.0)[:, None] * warm)

    textures = Textures(
        grain_offset=d.uniforms(0.0, 512.0, 2), blotch_scale=d.uniform(180.0, 512.0),
        blotch_offset=d.uniforms(0.0, 512.0, 2), strand_freq=d.uniform(9.0, 22.0),
        stripe_u=np.zeros(n), stripe_v=np.zeros(n))
    stripe_angle, stripe_freq = d.uniform(0.0, np.pi), d.uniform(4.0, 14.0)
    textures = Textures(**{**textures.__dict__, "stripe_u": np.cos(stripe_angle) * stripe_freq,
                           "stripe_v": np.sin(stripe_angle) * stripe_freq})

    backdrop = _sample_backdrop(d, skin, hair_col)

    # --- keypoints: 3-D anchors in head-local coordinates
    ex, ey, bx, by = face.eye_x, face.eye_y, face.brow_x, face.brow_y + face.brow_arch
    mx = face.mouth_w * 0.97
    my = face.mouth_y + face.smile * 0.94
    anchors = [
        _vec(-ex, ey, skin_z(-ex, ey), n=n), _vec(ex, ey, skin_z(ex, ey), n=n),
        _vec(-bx, by, skin_z(-bx, by), n=n), _vec(bx, by, skin_z(bx, by), n=n),
        nose_c + _vec(zero, -0.15 * nose_r[:, 1], 0.99 * nose_r[:, 2], n=n),
        _vec(-mx, my, skin_z(-mx, my), n=n), _vec(mx, my, skin_z(mx, my), n=n),
        jaw_c + jaw_r * np.array([0.0, -0.8, 0.6]),
    ]
    ear_point = np.array([0.8, 0.0, 0.6])
    for side, turn in ((-1.0, ear_turn_r), (1.0, ear_turn_l)):
        anchors.append(mirrored(ear_c, side) + np.einsum("nij,nj->ni", turn, ear_r * ear_point * [side, 1, 1]))
    keypoints = head.point(np.stack(anchors, 1))

    return HeadScene(
        n=n, head=head, local=local, prims=prims,
        hair_unit=_unit_coords(local, hair_c, hair_r), hair_clip=hair_clip,
        hat_unit=_unit_coords(local, hat_c, hat_r), hat_clip=hat_clip,
        glasses=glasses, face=face, materials=mats, light=light, textures=textures, backdrop=backdrop,
        keypoints=keypoints, visibility_tol=0.03 * scale,
        grain=d.uniform(0.0, 0.03), contrast=d.uniform(0.85, 1.1), brightness=d.uniform(-0.05, 0.05),
    )


def _sample_backdrop(d: Draws, skin: np.ndarray, hair: np.ndarray, shapes: int = 5) -> Backdrop:
    """Background: sometimes in the colours of the skin or hair, so that they are confusable."""
    n = d.n

    def colour() -> np.ndarray:
        look_alike = d.choice([6.0, 1.5, 1.0])  # random, skin-like, hair-like
        near = np.where((look_alike == 1)[:, None], skin, hair) * d.uniforms(0.85, 1.15, 3)
        return np.clip(np.where((look_alike == 0)[:, None], _random_colour(d), near), 0, 1)

    angle = d.uniform(0.0, 2 * np.pi)
    extent = d.uniform(0.3, 1.5)
    kinds, centres, sizes, angles, colours, opacity, stripes, freq = [], [], [], [], [], [], [], []
    c0, c1 = colour(), colour()
    for _ in range(shapes):
        kinds.append(d.choice([1.0, 1.0]))
        centres.append(d.uniforms(-1.2, 1.2, 2))
        sizes.append(d.uniforms(0.08, 0.7, 2))
        a = d.uniform(0.0, np.pi)
        angles.append(np.stack([np.cos(a), np.sin(a)], -1))
        colours.append(colour())
        opacity.append(np.where(d.chance(0.8), d.uniform(0.5, 1.0), 0.0))
        stripes.append(np.where(d.chance(0.3), d.uniform(0.1, 0.4), 0.0))
        freq.append(d.uniform(3.0, 12.0))
    return Backdrop(
        colour0=c0, colour1=c1,
        direction=np.stack([np.cos(angle), np.sin(angle)], -1) / extent[:, None],
        blotch=d.uniform(0.0, 0.25), kind=np.stack(kinds, -1), centre=np.stack(centres, 1),
        size=np.stack(sizes, 1), angle=np.stack(angles, 1), colour=np.stack(colours, 1),
        opacity=np.stack(opacity, -1), stripes=np.stack(stripes, -1), stripe_freq=np.stack(freq, -1),
    )
