"""The hypercolumn labeler: an ensemble of per-pixel MLPs on StyleGAN2 synthesis features.

Every member is ``Linear-ReLU-BatchNorm-Linear-ReLU-BatchNorm-Linear`` (one ReLU-BatchNorm
per hidden width; HandsOff/DatasetGAN's faces setting is hidden (256, 32), ten members). Its
input is a pixel's hypercolumn: the selected synthesis feature maps bilinearly resized to the
label resolution (`handsoff.label.features`). The members' weights are stacked (``[K, out,
in]``) so every layer of the whole ensemble is one batched matrix product.

Inference never builds the hypercolumn stack. Resizing is linear and acts on each channel
alike, so for the first layer ``W concat_l(up(f_l)) + b == sum_l up(W_l f_l) + b``
(DESIGN.md, "The identity that makes labeling cheap"). `HypercolumnLabeler.predict` projects
each resolution's features with all members' ``W_l`` at once (``[C_l, K*H1]``) at that
resolution, resizes the projections to the label resolution and adds them, then runs the
rest of the MLPs (BatchNorm folded into the next Linear). It works on bands of label rows:
each band projects only the source rows it reads (kept in a rolling window, so each row is
projected once per image), resizes them along y with the band's exact resampling matrix and
along x with PyTorch's bilinear kernel (or one dense product for the smallest resolutions),
so its memory is a few band-sized buffers, whatever the image size. Measured at 256x256
(benchmarks/labeler.py): about 7x faster than the naive computation and 100x less memory;
the floor is the work at the label resolution itself (projecting the full-resolution layers
and the second layer, ``2*K*H1*(C_R + H2)`` flops per pixel) plus a few memory passes per
resolution for resizing. `HypercolumnLabeler.predict_naive` is the textbook
upsample-concatenate-MLP computation, kept as the reference.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handsoff.label.features import LinearResample, naive_hypercolumns, resolution_groups, select_layers
from handsoff.label.heads import PredictionBuilder, default_keypoint_sigma
from handsoff.label.prediction import LabelPrediction

__all__ = ["TASKS", "LabelerConfig", "StackedLinear", "StackedBatchNorm", "HypercolumnLabeler", "member_seed"]

TASKS = ("seg", "keypoints", "depth")
CONFIG_VERSION = 1
#: Hidden activations (floats) per inference band: K*H1 channels x pixels. 2**20 floats = 4 MiB;
#: the band's buffers total about four times that. Larger bands were not faster here.
BAND_ELEMENTS = 1 << 20
# Resizing a band along x: a dense [R, r] matrix product costs r multiply-adds per output,
# F.interpolate about two memory passes. Measured on this project's CPU (one thread, K*H1 =
# 2560) the matrix product wins up to r = 16.
_DENSE_X_MAX = 16


def member_seed(seed: int, member: int, purpose: int) -> int:
    """An independent 63-bit seed for one member and one purpose (0 = init, 1 = pixel stream)."""
    return int(np.random.SeedSequence([seed, member, purpose]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class LabelerConfig:
    """What a labeler computes: its features, network widths and tasks.

    Attributes:
        feature_shapes: ``(channels, resolution)`` of *every* synthesis feature of the
            generator (``G.feature_shapes()``), low to high resolution.
        layers: indices into ``feature_shapes`` of the features used, increasing.
        label_resolution: side of the (square) label maps.
        hidden: hidden widths of each MLP (at least one).
        ensemble: number of members K.
        classes: segmentation class names (index 0 = background); empty = no segmentation.
        keypoint_names: keypoint names; empty = no keypoints.
        depth: whether the labeler predicts depth.
        depth_log_mean, depth_log_std: normalisation of log-depth (from the training labels).
        keypoint_sigma: heatmap sigma in label pixels (None = `default_keypoint_sigma`).
        keypoint_peak: the mean ensemble heatmap peak at the visible keypoints of the training
            images, measured after training; keypoint confidence = peak / keypoint_peak, clipped
            to [0, 1]. Per-pixel MLPs give smooth heatmaps whose peaks stay well below the
            target's 1, so without this calibration a well-found point would read as 0.2-0.4
            and downstream "confidence >= 0.5" rules would drop every point.
    """

    feature_shapes: tuple[tuple[int, int], ...]
    layers: tuple[int, ...]
    label_resolution: int
    hidden: tuple[int, ...] = (256, 32)
    ensemble: int = 10
    classes: tuple[str, ...] = ()
    keypoint_names: tuple[str, ...] = ()
    depth: bool = False
    depth_log_mean: float = 0.0
    depth_log_std: float = 1.0
    keypoint_sigma: Optional[float] = None
    keypoint_peak: float = 1.0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("feature_shapes", tuple((int(c), int(r)) for c, r in self.feature_shapes))
        set_("layers", tuple(int(i) for i in self.layers))
        set_("hidden", tuple(int(h) for h in self.hidden))
        set_("classes", tuple(str(c) for c in self.classes))
        set_("keypoint_names", tuple(str(k) for k in self.keypoint_names))
        if self.keypoint_sigma is None:
            set_("keypoint_sigma", default_keypoint_sigma(self.label_resolution))
        self._validate()

    def _validate(self) -> None:
        n = len(self.feature_shapes)
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or not 0 <= self.layers[0] <= \
                self.layers[-1] < n:
            raise ValueError(f"layers must be increasing indices into the {n} feature maps, got {list(self.layers)}")
        if self.label_resolution < 1 or self.ensemble < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"need label_resolution >= 1, ensemble >= 1 and positive hidden widths, got "
                             f"{self.label_resolution}, {self.ensemble}, {list(self.hidden)}")
        if not self.tasks:
            raise ValueError("a labeler needs at least one task (classes, keypoint_names or depth)")
        if self.classes and len(self.classes) < 2:
            raise ValueError("segmentation needs at least two classes")
        if not (self.depth_log_std > 0 and math.isfinite(self.depth_log_mean)) or not self.keypoint_sigma > 0:
            raise ValueError("depth_log_std and keypoint_sigma must be positive, depth_log_mean finite")
        if not 0 < self.keypoint_peak <= 1:
            raise ValueError(f"keypoint_peak must be in (0, 1], got {self.keypoint_peak}")

    # ------------------------------------------------------------------ derived
    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this labeler predicts, in output-channel order."""
        on = {"seg": bool(self.classes), "keypoints": bool(self.keypoint_names), "depth": self.depth}
        return tuple(t for t in TASKS if on[t])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def task_slices(self) -> dict[str, slice]:
        """Output channels of each task: seg C logits, keypoint K heatmap logits, 1 depth."""
        widths = {"seg": len(self.classes), "keypoints": len(self.keypoint_names), "depth": 1}
        out, start = {}, 0
        for task in self.tasks:
            out[task] = slice(start, start + widths[task])
            start += widths[task]
        return out

    @property
    def out_channels(self) -> int:
        return max(s.stop for s in self.task_slices.values())

    @property
    def used_shapes(self) -> list[tuple[int, int]]:
        return [self.feature_shapes[i] for i in self.layers]

    @property
    def channels(self) -> int:
        """Hypercolumn channels (the first layer's input width)."""
        return sum(c for c, _ in self.used_shapes)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary with ``config_version``; inverse of `from_dict`."""
        d = asdict(self)
        d["feature_shapes"] = [list(s) for s in self.feature_shapes]
        for key in ("layers", "hidden", "classes", "keypoint_names"):
            d[key] = list(d[key])
        return {"config_version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelerConfig":
        """Build from `to_dict` output; an unknown version or key raises ValueError."""
        d = dict(d)
        version = d.pop("config_version", None)
        if version != CONFIG_VERSION:
            raise ValueError(f"unsupported labeler config_version {version!r} (this code reads {CONFIG_VERSION})")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown labeler config keys: {unknown}")
        return cls(**d)


class StackedLinear(nn.Module):
    """K independent linear layers applied together: ``weight [K, out, in]``, ``bias [K, out]``."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))

    def reset_member(self, k: int, generator: torch.Generator) -> None:
        """nn.Linear's default initialisation, U(-1/sqrt(in), 1/sqrt(in)), from ``generator``."""
        bound = 1.0 / math.sqrt(self.weight.shape[2])
        with torch.no_grad():
            for p in (self.weight, self.bias):
                p[k].copy_(torch.rand(p[k].shape, generator=generator) * 2 * bound - bound)

    def forward(self, x: Tensor) -> Tensor:
        """``[P, in]`` (shared by all members) or ``[K, P, in]`` -> ``[K, P, out]``."""
        if x.ndim == 2:
            return torch.matmul(x, self.weight.transpose(1, 2)) + self.bias[:, None]
        return torch.baddbmm(self.bias[:, None], x, self.weight.transpose(1, 2))


class StackedBatchNorm(nn.Module):
    """K independent BatchNorm1d layers over ``[K, P, H]`` (statistics over P, per member)."""

    def __init__(self, members: int, features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(members, features))
        self.bias = nn.Parameter(torch.zeros(members, features))
        self.register_buffer("running_mean", torch.zeros(members, features))
        self.register_buffer("running_var", torch.ones(members, features))

    def affine(self) -> tuple[Tensor, Tensor]:
        """Eval-mode BatchNorm as ``x * scale + shift`` (``[K, H]`` each)."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        """``[K, P, H]`` -> ``[K, P, H]`` (a strided view).

        Runs as one native BatchNorm over ``K*H`` channels of a ``[P, K*H]`` copy: PyTorch's
        reductions over the middle axis of ``[K, P, H]`` are several times slower. Running
        statistics follow nn.BatchNorm1d (momentum, unbiased running variance).
        """
        k, p, h = x.shape
        flat = x.transpose(0, 1).reshape(p, k * h)
        y = F.batch_norm(flat, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                         self.bias.view(-1), training=self.training, momentum=self.momentum, eps=self.eps)
        return y.view(p, k, h).transpose(0, 1)


class HypercolumnLabeler(nn.Module):
    """An ensemble of K per-pixel MLPs over hypercolumns, with exact factorised inference.

    Args:
        config: what to compute (`LabelerConfig`).
        seed: member ``k`` is initialised from ``member_seed(seed, k, 0)``.
    """

    def __init__(self, config: LabelerConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        k = config.ensemble
        widths = (config.channels, *config.hidden, config.out_channels)
        self.linears = nn.ModuleList(StackedLinear(k, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(StackedBatchNorm(k, h) for h in config.hidden)
        self.groups = resolution_groups(config.used_shapes)
        self.generator_digest: Optional[str] = None  # set by `handsoff.label.io.load_labeler`
        self.extra: dict[str, Any] = {}  # the file's free-form record, likewise
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        for k in range(self.config.ensemble):
            generator = torch.Generator().manual_seed(member_seed(seed, k, 0))
            for linear in self.linears:
                linear.reset_member(k, generator)

    # ------------------------------------------------------------------ training
    def forward_rows(self, rows: Tensor) -> Tensor:
        """Raw outputs of every member for hypercolumn rows.

        Args:
            rows: float32 ``[P, C]`` (the same rows for all members) or ``[K, P, C]`` (each
                member its own rows, as in training), C = ``config.channels``.

        Returns:
            ``[K, P, config.out_channels]``: per `LabelerConfig.task_slices`, segmentation
            logits, keypoint-heatmap logits and normalised log-depth. BatchNorm uses batch
            statistics in training mode and running statistics in eval mode.
        """
        h = rows
        for linear, norm in zip(self.linears[:-1], self.norms):
            h = norm(torch.relu(linear(h)))
        return self.linears[-1](h)

    forward = forward_rows

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, features: Sequence[Tensor], *, band_elements: int = BAND_ELEMENTS) -> LabelPrediction:
        """Labels and uncertainties of N images from their synthesis features (factorised, exact).

        Args:
            features: every synthesis feature map, exactly as ``G.synthesis(ws,
                return_features=True)`` returns them (``[N, C_l, r_l, r_l]`` float32); the
                labeler selects its layers.
            band_elements: hidden activations (floats) computed at once; bounds the memory.

        Returns:
            A `LabelPrediction` of N images at the label resolution (eval-mode BatchNorm,
            whatever ``self.training`` is).
        """
        return self._predict(features, naive=False, band_elements=band_elements)

    @torch.no_grad()
    def predict_naive(self, features: Sequence[Tensor]) -> LabelPrediction:
        """`predict` computed the naive way: upsample every map, concatenate, run the MLPs.

        Needs ``4 * N * R^2 * (C + K*H1)`` bytes at once: the reference for tests and benchmarks.
        """
        return self._predict(features, naive=True)

    @torch.no_grad()
    def raw_outputs(self, features: Sequence[Tensor], naive: bool = False,
                    band_elements: int = BAND_ELEMENTS) -> Tensor:
        """Every member's raw outputs ``[K, N, R, R, out]`` (eval mode), factorised or naive.

        For tests and diagnostics: unlike `predict` it keeps all members' outputs.
        """
        maps = self._maps(features)
        n, r = maps[0].shape[0], self.config.label_resolution
        out = torch.empty(self.config.ensemble, n, r, r, self.config.out_channels, device=maps[0].device)
        for images, rows, block in self._blocks(maps, naive, band_elements):
            out[:, images, rows] = block
        return out

    def _predict(self, features: Sequence[Tensor], naive: bool, band_elements: int = BAND_ELEMENTS) -> LabelPrediction:
        maps = self._maps(features)
        builder = PredictionBuilder(self.config, maps[0].shape[0], maps[0].device)
        for images, rows, block in self._blocks(maps, naive, band_elements):
            builder.add(images, rows, block)
        return builder.finish()

    def _blocks(self, maps: list[Tensor], naive: bool, band_elements: int) -> Iterator[tuple[slice, slice, Tensor]]:
        """Raw outputs ``(images, label rows, [K, n, T, R, out])``: all at once (naive) or band by band."""
        if naive:
            yield slice(0, maps[0].shape[0]), slice(0, self.config.label_resolution), self._naive_outputs(maps)
        else:
            yield from self._factorised_bands(maps, band_elements)

    def _maps(self, features: Sequence[Tensor]) -> list[Tensor]:
        device = self.linears[0].weight.device
        maps = select_layers(features, self.config.layers, self.config.feature_shapes)
        return [m.to(device, torch.float32) for m in maps]

    def _eval_rows(self, rows: Tensor) -> Tensor:
        training = self.training
        self.train(False)
        try:
            return self.forward_rows(rows)
        finally:
            self.train(training)

    def _naive_outputs(self, maps: list[Tensor]) -> Tensor:
        n, r = maps[0].shape[0], self.config.label_resolution
        stack = naive_hypercolumns(maps, r)  # [N, C, R, R]
        rows = stack.permute(0, 2, 3, 1).reshape(n * r * r, -1)
        return self._eval_rows(rows).view(self.config.ensemble, n, r, r, -1)

    def _folded_tail(self) -> list[tuple[Tensor, Tensor]]:
        """Layers 2.. in eval mode with each BatchNorm folded into the Linear after it.

        ``W (x * s + t) + b == (W * s) x + (W t + b)``. Returns ``(weight [K, in, out], bias
        [K, 1, out])`` per layer, ready for ``baddbmm``.
        """
        tail = []
        for norm, linear in zip(self.norms, self.linears[1:]):
            scale, shift = norm.affine()
            weight = linear.weight * scale[:, None, :]
            bias = linear.bias + torch.einsum("koi,ki->ko", linear.weight, shift)
            tail.append((weight.transpose(1, 2), bias[:, None, :]))
        return tail

    def _bands(self, n: int, band_elements: int) -> Iterator[tuple[slice, slice]]:
        """(images, label rows) blocks holding about ``band_elements`` hidden activations each."""
        r, width = self.config.label_resolution, self.config.ensemble * self.config.hidden[0]
        per_image = r * r * width
        if per_image <= band_elements:
            step = max(1, band_elements // per_image)
            for i in range(0, n, step):
                yield slice(i, min(n, i + step)), slice(0, r)
            return
        rows = max(1, band_elements // (r * width))
        for i in range(n):
            for y in range(0, r, rows):
                yield slice(i, i + 1), slice(y, min(r, y + rows))

    def _factorised_bands(self, maps: list[Tensor], band_elements: int) -> Iterator[tuple[slice, slice, Tensor]]:
        """Yield ``(images, rows, outputs [K, n, T, R, out])`` band by band.

        The outputs live in a reused buffer: use them before asking for the next band.
        """
        factorised = _FactorisedPass(self, maps, band_elements)
        for images, rows in self._bands(maps[0].shape[0], band_elements):
            yield images, rows, factorised.band(images, rows)


class _Workspace:
    """Scratch buffers reused from band to band.

    A band's temporaries are megabytes; glibc serves such blocks with fresh mmaps (or trims
    them off the heap) and every new page faults on first touch, which made the band loop
    several times slower than the arithmetic. Allocating them once per call avoids that.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, Tensor] = {}

    def take(self, name: str, *shape: int) -> Tensor:
        """A float32 tensor of ``shape`` (contiguous, uninitialised) backed by buffer ``name``."""
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(numel, device=self.device)
        return buffer[:numel].view(shape)


class _FactorisedPass:
    """The factorised forward pass of one labeler over one batch of feature maps, band by band."""

    def __init__(self, labeler: HypercolumnLabeler, maps: list[Tensor], band_elements: int) -> None:
        cfg = labeler.config
        self.k, self.h1, self.r = cfg.ensemble, cfg.hidden[0], cfg.label_resolution
        first = labeler.linears[0]
        # All members' first-layer weights side by side: [C, K*H1], member-major columns.
        self.weight = first.weight.permute(2, 0, 1).reshape(cfg.channels, self.k * self.h1)
        self.bias = first.bias.reshape(-1)
        self.groups = labeler.groups
        self.maps = [[maps[p] for p in g.positions] for g in self.groups]  # per group: its layers' maps
        device = self.weight.device
        self.plans = {g.resolution: LinearResample.create(g.resolution, self.r, device) for g in self.groups}
        # The group at the label resolution (equal resolutions are consecutive: one group each).
        self.full = next((gi for gi, g in enumerate(self.groups) if g.resolution == self.r), None)
        # Groups resized along x by one dense product: their resolutions and [R, sum r] matrix.
        self.dense = [g.resolution for g in self.groups if g.resolution != self.r and g.resolution <= _DENSE_X_MAX]
        self.dense_matrix = torch.cat([self.plans[res].matrix() for res in self.dense], 1) if self.dense else None
        self.y_bands: dict[tuple[int, int, int], tuple[int, int, Tensor]] = {}
        # Per group: (first image, first source row, projected source rows [n, rows, res*K*H1]).
        self.projected: dict[int, tuple[int, int, Tensor]] = {}
        self.turn: dict[int, int] = {}
        self.cache_elements = max(1, band_elements // 4)
        self.tail = labeler._folded_tail()
        self.ws = _Workspace(device)

    def band(self, images: slice, rows: slice) -> Tensor:
        """Raw outputs ``[K, n, T, R, out]`` of label rows ``rows`` of images ``images``."""
        acc = self.first_layer(images, rows)
        n, t = acc.shape[:2]
        h = torch.relu_(acc).view(-1, self.k, self.h1).transpose(0, 1)  # [K, P, H1], a strided view
        for i, (weight, bias) in enumerate(self.tail):
            out = self.ws.take(f"tail{i}", self.k, h.shape[1], weight.shape[2])
            h = torch.baddbmm(bias, h, weight, out=out)
            if i < len(self.tail) - 1:
                h = torch.relu_(h)
        return h.view(self.k, n, t, self.r, -1)

    def first_layer(self, images: slice, rows: slice) -> Tensor:
        """First-layer pre-activations of all members for one band: ``[n, T, R, K*H1]``.

        Groups at the label resolution are projected pixel by pixel. Every other group is
        projected at its own resolution on the source rows the band reads, resized along y
        with the band's dense resampling matrix, then along x (a dense matrix product for
        small resolutions, PyTorch's bilinear kernel otherwise), and added.
        """
        n, t, r = images.stop - images.start, rows.stop - rows.start, self.r
        width = self.weight.shape[1]
        acc = self.ws.take("acc", n * t * r, width)
        if self.full is not None:  # the label-resolution group first: its product brings the bias
            columns = self.groups[self.full].columns
            torch.addmm(self.bias, self._pixel_rows(self.full, images, rows), self.weight[columns], out=acc)
        else:
            acc.copy_(self.bias.expand_as(acc))
        dense = self.ws.take("dense", n * t, sum(self.dense), width) if self.dense else None
        offset = 0
        for gi, group in enumerate(self.groups):
            res = group.resolution
            if res == r:
                continue
            s0, s1, ay = self._y_band(res, rows)
            resized = self.ws.take("resized", n, t, res * width)
            torch.bmm(ay.expand(n, -1, -1), self._projected(gi, images, s0, s1), out=resized)
            if res in self.dense:
                dense[:, offset:offset + res] = resized.view(n * t, res, width)
                offset += res
                continue
            up = self.ws.take("up", n, t, r, width)
            torch.ops.aten.upsample_bilinear2d.out(  # F.interpolate(mode='bilinear') into a reused buffer
                resized.view(n, t, res, width).permute(0, 3, 1, 2), [t, r], False, None, None,
                out=up.permute(0, 3, 1, 2))
            acc.add_(up.view(-1, width))
        if dense is not None:  # one product for all small resolutions: fewer, larger matrix products
            acc.view(n * t, r, width).baddbmm_(self.dense_matrix.expand(n * t, -1, -1), dense)
        return acc.view(n, t, r, width)

    def _projected(self, gi: int, images: slice, s0: int, s1: int) -> Tensor:
        """Group ``gi``'s features on source rows ``s0:s1`` projected by all members: ``[n, s1-s0, res*K*H1]``.

        Consecutive bands read overlapping source rows, so projected rows are kept in a
        rolling window (about ``band_elements / 4`` floats, at least the rows a band needs):
        each source row is projected once per image.
        """
        group = self.groups[gi]
        n, res, width = images.stop - images.start, group.resolution, self.weight.shape[1]
        kept = None
        cached = self.projected.get(gi)
        if cached is not None and cached[0] == images.start:
            first, window = cached[1], cached[2]
            if first <= s0 and s1 <= first + window.shape[1]:
                return window[:, s0 - first:s1 - first]
            if first <= s0 < first + window.shape[1]:
                kept = window[:, s0 - first:]
        stop = min(res, max(s1, s0 + self.cache_elements // (n * res * width)))
        # Two buffers per group, used in turn, so that kept rows are copied from the other one.
        turn = self.turn[gi] = 1 - self.turn.get(gi, 1)
        out = self.ws.take(f"projected{gi}.{turn}", n, stop - s0, res * width)
        if kept is None:
            torch.mm(self._pixel_rows(gi, images, slice(s0, stop)), self.weight[group.columns], out=out.view(-1, width))
        else:
            out[:, :kept.shape[1]] = kept
            start = s0 + kept.shape[1]
            fresh = self.ws.take("fresh", n * (stop - start) * res, width)
            torch.mm(self._pixel_rows(gi, images, slice(start, stop)), self.weight[group.columns], out=fresh)
            out[:, start - s0:] = fresh.view(n, stop - start, res * width)
        self.projected[gi] = (images.start, s0, out)
        return out[:, :s1 - s0]

    def _y_band(self, res: int, rows: slice) -> tuple[int, int, Tensor]:
        key = (res, rows.start, rows.stop)
        if key not in self.y_bands:
            self.y_bands[key] = self.plans[res].band(rows.start, rows.stop)
        return self.y_bands[key]

    def _pixel_rows(self, gi: int, images: slice, rows: slice) -> Tensor:
        """Group ``gi``'s features of ``rows`` as pixel rows ``[n*t*w, C_group]``, in a reused buffer."""
        layers = self.maps[gi]
        n, t, w = images.stop - images.start, rows.stop - rows.start, layers[0].shape[3]
        out = self.ws.take("pixel_rows", n, t, w, self.groups[gi].channels)
        offset = 0
        for fmap in layers:  # each layer into its columns: the group's maps are never concatenated
            out[..., offset:offset + fmap.shape[1]] = fmap[images, :, rows].permute(0, 2, 3, 1)
            offset += fmap.shape[1]
        return out.view(-1, out.shape[-1])
