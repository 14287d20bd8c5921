"""Hypercolumn features without the hypercolumn: exact bilinear resampling, grouped by resolution.

A hypercolumn is every selected synthesis feature map bilinearly resized to the label
resolution ``R`` (``F.interpolate(mode='bilinear', align_corners=False)``) and concatenated
along channels. Stacked for a whole image it is ``C x R x R`` (6080 x 512 x 512 for FFHQ),
so this module never builds it except in `naive_hypercolumns` (the reference for tests and
benchmarks). Instead:

* `LinearResample` reproduces PyTorch's source-index formula ``src = (dst + 0.5) * in / out
  - 0.5`` (clamped at 0) and its weights, so single rows (training) and bands of rows
  (inference) of the resized maps can be computed from the small native-resolution maps and
  agree with ``F.interpolate`` to float rounding.
* `resolution_groups` merges the selected layers that share a resolution (a block's two
  convolutions) so each resolution is resampled once.
* `FeatureBank` keeps the per-layer maps of the labeled images channels-last at their own
  resolution and gathers hypercolumn rows ``[P, C]`` for sampled pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LinearResample", "ResolutionGroup", "resolution_groups", "select_layers", "naive_hypercolumns",
           "FeatureBank"]


@dataclass(frozen=True)
class LinearResample:
    """1-D bilinear (linear) resampling ``in_size -> out_size`` with ``align_corners=False``.

    Output sample ``d`` is ``lam0[d] * x[idx0[d]] + lam1[d] * x[idx1[d]]``. The indices and
    weights are PyTorch's (``upsample_bilinear2d`` on the CPU), bit for bit:
    ``src = scale * (d + 0.5) - 0.5`` (float32, one fused multiply-add) with
    ``scale = float32(in) / out``, clamped at 0; ``idx0 = min(floor(src), in - 1)``,
    ``idx1 = idx0 + (idx0 < in - 1)``, ``lam1 = clamp(src - idx0, 0, 1)``, ``lam0 = 1 - lam1``.
    Equal sizes give the identity (``lam1 = 0``), as in PyTorch. Downsampling uses the same
    two-tap formula (no antialiasing), again as ``F.interpolate`` does by default.

    Attributes:
        in_size, out_size: the two lengths.
        idx0, idx1: int64 ``[out_size]`` source indices.
        lam0, lam1: float32 ``[out_size]`` weights.
    """

    in_size: int
    out_size: int
    idx0: Tensor
    idx1: Tensor
    lam0: Tensor
    lam1: Tensor

    @staticmethod
    def create(in_size: int, out_size: int, device: torch.device | str = "cpu") -> "LinearResample":
        if in_size < 1 or out_size < 1:
            raise ValueError(f"resample sizes must be positive, got {in_size} -> {out_size}")
        dst = torch.arange(out_size, dtype=torch.float64)
        if in_size == out_size:
            idx0 = dst.long()
            lam1 = torch.zeros(out_size)
        else:
            # PyTorch's kernel computes fma(scale, dst + 0.5, -0.5) in float32 (one rounding):
            # exact in float64, then rounded to float32.
            scale = float(np.float32(in_size) / np.float32(out_size))
            src = (scale * (dst + 0.5) - 0.5).float().clamp_min(0.0)
            idx0 = src.floor().long().clamp_max(in_size - 1)
            lam1 = (src - idx0).clamp(0.0, 1.0)
        idx1 = idx0 + (idx0 < in_size - 1).long()
        return LinearResample(in_size, out_size, idx0.to(device), idx1.to(device), (1.0 - lam1).to(device),
                              lam1.to(device))

    def band(self, start: int, stop: int) -> tuple[int, int, Tensor]:
        """The resampling of output samples ``start:stop`` as a dense matrix on the source rows it reads.

        Returns:
            ``(s0, s1, A)``: output ``start + i`` equals ``sum_j A[i, j] * x[s0 + j]``; ``A`` is
            float32 ``[stop - start, s1 - s0]``.
        """
        i0, i1 = self.idx0[start:stop], self.idx1[start:stop]
        s0, s1 = int(i0.min()), int(i1.max()) + 1
        rows = torch.arange(stop - start, device=i0.device)
        matrix = torch.zeros(stop - start, s1 - s0, device=i0.device)
        matrix.index_put_((rows, i0 - s0), self.lam0[start:stop], accumulate=True)
        matrix.index_put_((rows, i1 - s0), self.lam1[start:stop], accumulate=True)
        return s0, s1, matrix

    def matrix(self) -> Tensor:
        """The whole resampling as a dense float32 ``[out_size, in_size]`` matrix."""
        s0, s1, band = self.band(0, self.out_size)
        return F.pad(band, (s0, self.in_size - s1))


@dataclass(frozen=True)
class ResolutionGroup:
    """Selected layers that share one resolution, and where their channels sit in a hypercolumn row.

    Attributes:
        resolution: the layers' (square) resolution.
        positions: indices into the list of *selected* layers.
        channels: total channels of the group.
        offset: first hypercolumn channel of the group (hypercolumn channels follow the
            selected layers in order).
    """

    resolution: int
    positions: tuple[int, ...]
    channels: int
    offset: int

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.channels)


def resolution_groups(shapes: Sequence[tuple[int, int]]) -> list[ResolutionGroup]:
    """Group consecutive ``(channels, resolution)`` shapes of equal resolution.

    The generator lists its features low to high resolution, so a block's convolutions are
    consecutive; equal resolutions that are not consecutive form separate groups.
    """
    groups: list[ResolutionGroup] = []
    offset = 0
    for pos, (channels, res) in enumerate(shapes):
        if groups and groups[-1].resolution == res:
            last = groups[-1]
            groups[-1] = ResolutionGroup(res, last.positions + (pos,), last.channels + channels, last.offset)
        else:
            groups.append(ResolutionGroup(res, (pos,), channels, offset))
        offset += channels
    return groups


def select_layers(features: Sequence[Tensor], layers: Sequence[int],
                  shapes: Optional[Sequence[tuple[int, int]]] = None) -> list[Tensor]:
    """``features[i]`` for ``i`` in ``layers``, checking that every map is ``[N, C, r, r]`` as expected.

    Args:
        features: every synthesis feature map, as ``G.synthesis(..., return_features=True)`` gives.
        layers: indices to keep.
        shapes: the expected ``(channels, resolution)`` of *every* feature (the generator's
            ``feature_shapes()``); when given, a mismatch raises ValueError.
    """
    if shapes is not None and len(features) != len(shapes):
        raise ValueError(f"expected {len(shapes)} feature maps (one per synthesis conv), got {len(features)}")
    out = []
    for i in layers:
        f = features[i]
        if f.ndim != 4 or f.shape[2] != f.shape[3] or (shapes is not None and tuple(f.shape[1:3]) != tuple(shapes[i])):
            want = f"[N, {shapes[i][0]}, {shapes[i][1]}, {shapes[i][1]}]" if shapes is not None else "[N, C, r, r]"
            raise ValueError(f"feature map {i} must be {want}, got {list(f.shape)}")
        out.append(f)
    if len({f.shape[0] for f in out}) > 1:
        raise ValueError("feature maps hold different numbers of images")
    return out


def naive_hypercolumns(maps: Sequence[Tensor], label_resolution: int) -> Tensor:
    """The full hypercolumn stack ``[N, C, R, R]``: every map bilinearly resized to R, concatenated.

    This is the reference computation (and what DatasetGAN/HandsOff keep in memory); it costs
    ``4 * N * C * R * R`` bytes.
    """
    size = (label_resolution, label_resolution)
    return torch.cat([F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps], 1)


class FeatureBank:
    """Per-resolution feature maps of N images, kept at native resolution, with exact row gathering.

    Holds one channels-last float32 tensor ``[N, r, r, C_group]`` per `ResolutionGroup`, so
    its memory is the size of the selected feature maps (``4 * N * sum_l C_l r_l^2`` bytes),
    not of the upsampled stack (``4 * N * C * R^2``).
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], num_images: int, label_resolution: int,
                 device: torch.device | str = "cpu") -> None:
        """Allocate (uninitialised) room for ``num_images`` images; fill it with `write`.

        Args:
            shapes: ``(channels, resolution)`` of the selected layers, in order.
            num_images: N.
            label_resolution: R.
            device: where the maps live.
        """
        self.label_resolution = int(label_resolution)
        self.num_images = int(num_images)
        self.groups = resolution_groups(shapes)
        self.maps = [torch.empty(num_images, g.resolution, g.resolution, g.channels, device=device)
                     for g in self.groups]
        self.plans = [LinearResample.create(g.resolution, self.label_resolution, device) for g in self.groups]
        self.channels = sum(g.channels for g in self.groups)

    @staticmethod
    def from_maps(maps: Sequence[Tensor], label_resolution: int) -> "FeatureBank":
        """A bank holding ``maps`` (the selected layers, each ``[N, C_l, r_l, r_l]``)."""
        bank = FeatureBank([(m.shape[1], m.shape[2]) for m in maps], maps[0].shape[0], label_resolution,
                           maps[0].device)
        bank.write(0, maps)
        return bank

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.maps)

    def write(self, start: int, maps: Sequence[Tensor]) -> None:
        """Store the selected layers of images ``start .. start + n - 1`` (each map ``[n, C_l, r_l, r_l]``)."""
        for group, dest in zip(self.groups, self.maps):
            offset = 0
            for p in group.positions:
                m = maps[p]
                dest[start:start + m.shape[0], :, :, offset:offset + m.shape[1]] = m.permute(0, 2, 3, 1)
                offset += m.shape[1]

    def gather(self, image: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """Hypercolumn rows of label pixels ``(image[i], y[i], x[i])``: float32 ``[P, C]``.

        Row ``i`` equals ``naive_hypercolumns(maps, R)[image[i], :, y[i], x[i]]`` up to float
        rounding: the same four source pixels and weights ``lam_y * lam_x``, summed by one
        ``F.embedding_bag`` per resolution (a fused weighted gather, several times faster
        than gathering the four taps and blending them tensor by tensor).
        """
        out = torch.empty(image.shape[0], self.channels, device=self.maps[0].device)
        for group, fmap, plan in zip(self.groups, self.maps, self.plans):
            r = group.resolution
            flat = fmap.view(-1, group.channels)
            base = image * (r * r)
            y0, y1, x0, x1 = plan.idx0[y], plan.idx1[y], plan.idx0[x], plan.idx1[x]
            if r == self.label_resolution:  # identity resampling: a plain gather
                out[:, group.columns] = flat[base + y0 * r + x0]
                continue
            ly0, ly1, lx0, lx1 = plan.lam0[y], plan.lam1[y], plan.lam0[x], plan.lam1[x]
            taps = torch.stack([base + y0 * r + x0, base + y0 * r + x1, base + y1 * r + x0, base + y1 * r + x1], 1)
            weights = torch.stack([ly0 * lx0, ly0 * lx1, ly1 * lx0, ly1 * lx1], 1)
            out[:, group.columns] = F.embedding_bag(taps, flat, per_sample_weights=weights, mode="sum")
        return out
