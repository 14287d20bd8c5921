"""Training the hypercolumn labeler on a few labeled images, without the hypercolumn matrix.

Each labeled image's selected feature maps are computed once and kept at their own resolution
(`FeatureBank`: 4 bytes x sum_l C_l r_l^2 per image). Each step every member draws its own
bootstrap sample of label pixels (image, y, x) from its own random stream, gathers their
hypercolumn rows from the maps by exact bilinear interpolation, and takes an Adam step on the
sum of its task losses (`handsoff.label.heads`). The N x R x R x C matrix that DatasetGAN and
HandsOff keep in memory (159 GB for 50 FFHQ images at 512) is never built.

Budget: the official code trains each member with Adam (lr 1e-3) on batches of 64 pixels and
stops early after a few epochs over every pixel of every image (epoch 4 or 5 typically). Here
the default is `DEFAULT_STEPS` steps of `DEFAULT_BATCH_PIXELS` pixels per member: 307k pixels,
about 4.7 passes over 16 images at 64x64, like the official epochs. On this project's shared
2-core CPU one step of ten members with hidden (256, 32) on the shipped 64x64 generator's 576
channels takes about 0.17 s of CPU time on one torch thread (0.28 s wall while the machine was
shared with other jobs): the default fit of 16 images takes one to one and a half minutes. A
proxy task (labels computed from generated pictures, 32 held-out images) scored the same
mIoU (0.47-0.48) with 250, 500 or 1000 steps of 1024 pixels and with 1000 x 512 or
2000 x 256, so longer runs buy little; larger batches use a GPU better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from handsoff.data.labeled_set import IGNORE_INDEX, LabeledSet
from handsoff.errors import HandsoffError
from handsoff.label.defaults import (DEFAULT_BATCH_PIXELS, DEFAULT_FLOW_METHOD, DEFAULT_STEPS, DEFAULT_TRANSFER,
                                     FLOW_METHODS, TRANSFER_MODES)
from handsoff.label.features import FeatureBank
from handsoff.label.heads import depth_loss, heatmap_targets, keypoint_loss
from handsoff.label.infer import synthesis_chunks
from handsoff.label.model import HypercolumnLabeler, LabelerConfig, member_seed
from handsoff.label.targets import LabelMaps, check_latents, check_square, labels_at_resolution, resolve_tasks
from handsoff.label.transfer import labels_on_reconstructions

__all__ = ["DEFAULT_STEPS", "DEFAULT_BATCH_PIXELS", "KEYPOINT_FRACTION", "fit_labeler", "feature_bank",
           "check_layers"]

#: Share of each member's pixels drawn near a visible keypoint (heatmap peaks are rare pixels).
KEYPOINT_FRACTION = 0.25
_FEATURE_BATCH = 4  # images per generator call while filling the feature bank
_MIN_LOG_STD = 1e-3


def check_layers(G: torch.nn.Module, layers: Optional[Sequence[int]]) -> tuple[int, ...]:
    """Feature indices to use: all for None; negative indices count from the end; checked and sorted."""
    count = len(G.feature_shapes())
    if layers is None:
        return tuple(range(count))
    chosen = sorted({int(i) + count if int(i) < 0 else int(i) for i in layers})
    if not chosen or chosen[0] < 0 or chosen[-1] >= count:
        raise HandsoffError(f"layers {list(layers)}: the generator has {count} feature maps (indices 0..{count - 1})")
    return tuple(chosen)


def feature_bank(G: torch.nn.Module, ws: Tensor, layers: Sequence[int], label_resolution: int,
                 device: torch.device | str = "cpu", batch_size: int = _FEATURE_BATCH) -> FeatureBank:
    """The selected synthesis features of ``ws`` (``noise_mode='const'``), stored at native resolution."""
    shapes = [G.feature_shapes()[i] for i in layers]
    bank = FeatureBank(shapes, ws.shape[0], label_resolution, device)
    for start, _, features in synthesis_chunks(G, ws, batch_size=batch_size):
        bank.write(start, [features[i].to(device) for i in layers])
    return bank


@dataclass
class _Targets:
    """Training targets at the label resolution, as tensors on the training device."""

    seg: Optional[Tensor]  # int64 [N, R, R], 255 = ignore
    keypoints: Optional[Tensor]  # float32 [N, K, 3]
    depth_z: Optional[Tensor]  # float32 [N, R, R] normalised log-depth, NaN = invalid
    keypoint_weight: Optional[Tensor] = None  # float32 [N, K]: 0 = unknown keypoint (not trained); None = all 1

    @staticmethod
    def create(maps: LabelMaps, log_mean: float, log_std: float, device: torch.device) -> "_Targets":
        seg = None if maps.seg is None else torch.from_numpy(maps.seg).long().to(device)
        keypoints = None if maps.keypoints is None else torch.from_numpy(maps.keypoints).to(device)
        depth_z = None
        if maps.depth is not None:
            depth_z = ((torch.from_numpy(maps.depth).log() - log_mean) / log_std).to(device)
        weight = None
        if maps.keypoint_known is not None and keypoints is not None:
            weight = torch.from_numpy(np.asarray(maps.keypoint_known, np.float32)).to(device)
        return _Targets(seg, keypoints, depth_z, weight)


def _depth_stats(depth: Optional[np.ndarray], labels: LabeledSet) -> tuple[float, float]:
    """Mean and standard deviation of log-depth over the valid pixels (0, 1 without depth)."""
    if depth is None:
        return 0.0, 1.0
    logs = np.log(depth[np.isfinite(depth)].astype(np.float64))
    if logs.size == 0:
        raise HandsoffError(f"{labels.root / 'depth'}: every depth label is invalid (non-finite or <= 0)")
    return float(logs.mean()), max(float(logs.std()), _MIN_LOG_STD)


class _PixelSampler:
    """Each member's own stream of training pixels (image, y, x), drawn with replacement.

    Uniform over all pixels (or class-balanced: a class uniformly among those present, then a
    pixel of it), plus `KEYPOINT_FRACTION` of the pixels within 3 sigma of a random visible
    keypoint when keypoints are learned.
    """

    def __init__(self, targets: _Targets, num_images: int, resolution: int, members: int, seed: int,
                 class_balanced: bool, sigma: float) -> None:
        self.n, self.r, self.sigma = num_images, resolution, sigma
        self.generators = [torch.Generator().manual_seed(member_seed(seed, k, 1)) for k in range(members)]
        self.by_class: Optional[tuple[Tensor, Tensor, Tensor]] = None
        if class_balanced:
            if targets.seg is None:
                raise HandsoffError("class-balanced sampling needs segmentation labels")
            flat = targets.seg.flatten().cpu()
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX]
            present = torch.nonzero(counts).flatten()
            starts = torch.cumsum(counts, 0) - counts
            self.by_class = (order, starts[present], counts[present])
        self.visible = None
        if targets.keypoints is not None:
            kp = targets.keypoints.cpu()
            image, point = torch.nonzero(kp[..., 2] > 0.5, as_tuple=True)
            if len(image):
                self.visible = (image, kp[image, point, 0], kp[image, point, 1])

    def sample(self, member: int, count: int) -> Tensor:
        """``[3, count]`` int64 rows: image, y, x."""
        g = self.generators[member]
        near = int(count * KEYPOINT_FRACTION) if self.visible is not None else 0
        flat = self._base(g, count - near)
        pixels = torch.stack([flat // (self.r * self.r), flat // self.r % self.r, flat % self.r])
        if near:
            image, px, py = self.visible
            pick = torch.randint(len(image), (near,), generator=g)
            offsets = (torch.rand(2, near, generator=g) * 2 - 1) * 3 * self.sigma
            x = (px[pick] + offsets[0]).floor().long().clamp(0, self.r - 1)
            y = (py[pick] + offsets[1]).floor().long().clamp(0, self.r - 1)
            pixels = torch.cat([pixels, torch.stack([image[pick], y, x])], 1)
        return pixels

    def _base(self, g: torch.Generator, count: int) -> Tensor:
        if self.by_class is None:
            return torch.randint(self.n * self.r * self.r, (count,), generator=g)
        order, starts, counts = self.by_class
        cls = torch.randint(len(counts), (count,), generator=g)
        within = (torch.rand(count, generator=g, dtype=torch.float64) * counts[cls]).long()
        return order[starts[cls] + within]


def _losses(out: Tensor, pixels: Tensor, targets: _Targets, config: LabelerConfig) -> dict[str, Tensor]:
    """Per-task losses ``[K]`` of raw outputs ``[K, P, out]`` at ``pixels`` ``[K, 3, P]``."""
    image, y, x = pixels.unbind(1)
    slices, losses = config.task_slices, {}
    if "seg" in slices:
        target = targets.seg[image, y, x]
        ce = F.cross_entropy(out[..., slices["seg"]].flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(target)
        valid = target != IGNORE_INDEX
        losses["seg"] = (ce * valid).sum(1) / valid.sum(1).clamp_min(1)
    if "keypoints" in slices:
        heat = heatmap_targets(targets.keypoints[image.flatten()], y.flatten(), x.flatten(), config.keypoint_sigma)
        logits = out[..., slices["keypoints"]]
        # An unknown keypoint (flow transfer lost it) is neither present nor absent: no loss on its image.
        weight = None if targets.keypoint_weight is None else targets.keypoint_weight[image]
        losses["keypoints"] = keypoint_loss(logits, heat.view_as(logits), weight)
    if "depth" in slices:
        losses["depth"] = depth_loss(out[..., slices["depth"].start], targets.depth_z[image, y, x], image,
                                     targets.depth_z.shape[0], config.depth_log_std)
    return losses


def fit_labeler(G: torch.nn.Module, ws: Tensor, labels: LabeledSet, *, tasks: Optional[Sequence[str]] = None,
                ensemble: int = 10, hidden: Sequence[int] = (256, 32), layers: Optional[Sequence[int]] = None,
                label_resolution: Optional[int] = None, steps: int = DEFAULT_STEPS,
                batch_pixels: int = DEFAULT_BATCH_PIXELS, lr: float = 1e-3, seed: int = 0,
                device: torch.device | str = "cpu", progress: bool = True, class_balanced: bool = False,
                transfer_labels: str = DEFAULT_TRANSFER, flow_method: str = DEFAULT_FLOW_METHOD,
                callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> HypercolumnLabeler:
    """Train a hypercolumn labeler on labeled images given by their latents.

    Args:
        G: the generator (`handsoff.gan.networks.Generator`); features use ``noise_mode='const'``.
        ws: float32 ``[N, num_ws, w_dim]``, row i the latents of ``labels.names[i]``.
        labels: the labeled set (images must be square; labels are resized to the label
            resolution, see `handsoff.label.targets`).
        tasks: subset of ``('seg', 'keypoints', 'depth')``; None = every task the set carries.
        ensemble: members K.
        hidden: hidden widths of each MLP. The default is the faces setting of the HandsOff
            paper and DESIGN.md, kept for every generator: even the shipped 64x64 generator's
            576 channels are compressed by the first layer (576 -> 256). The official
            DatasetGAN code uses (128, 32) below 32 classes; that halves the training and
            labeling cost, whose bulk is the first two layers.
        layers: feature indices to use (negative = from the end); None = all.
        label_resolution: side of the label maps; None = the generator's resolution.
        steps: Adam steps.
        batch_pixels: pixels per member per step.
        lr: Adam learning rate.
        seed: seeds the members' initialisation and pixel streams (runs are reproducible on one
            machine and thread count).
        device: where features and training live.
        progress: show a tqdm progress bar.
        class_balanced: draw segmentation classes uniformly instead of pixels (for rare parts).
        transfer_labels: ``'none'`` trains on the labels as given; ``'flow'`` first moves them
            onto the reconstructions ``G(ws)`` by dense optical flow (`handsoff.label.transfer`):
            where the inversion draws a part elsewhere, its label follows it, and pixels and
            keypoints whose correspondence fails the forward-backward check are not trained.
        flow_method: the optical flow of ``transfer_labels='flow'``: ``'dis'`` or ``'farneback'``.
        callback: called as ``callback(step, {"loss": ..., task: ...})`` after each step (means
            over members).

    Returns:
        The trained labeler, in eval mode, on ``device``.

    Raises:
        HandsoffError: ws/labels mismatch, unknown or absent tasks, bad layers, non-square images.
    """
    check_latents(G, ws, labels)
    if transfer_labels not in TRANSFER_MODES:
        raise HandsoffError(f"transfer_labels {transfer_labels!r}: use one of {', '.join(TRANSFER_MODES)}")
    if flow_method not in FLOW_METHODS:
        raise HandsoffError(f"flow_method {flow_method!r}: use one of {', '.join(FLOW_METHODS)}")
    task_list = resolve_tasks(labels, tasks)
    layer_list = check_layers(G, layers)
    resolution = int(label_resolution or G.img_resolution)
    if steps < 1 or batch_pixels < 2:
        raise HandsoffError(f"need steps >= 1 and batch_pixels >= 2, got {steps} and {batch_pixels}")
    device = torch.device(device)
    keypoint_known = None
    if transfer_labels == "flow":
        check_square(labels)
        moved = labels_on_reconstructions(G, ws, labels, method=flow_method)
        labels, keypoint_known = moved.labels, moved.keypoint_known
    maps = replace(labels_at_resolution(labels, resolution, task_list), keypoint_known=keypoint_known)
    log_mean, log_std = _depth_stats(maps.depth, labels)
    config = LabelerConfig(
        feature_shapes=tuple(G.feature_shapes()), layers=layer_list, label_resolution=resolution,
        hidden=tuple(hidden), ensemble=ensemble,
        classes=tuple(labels.classes) if "seg" in task_list else (),
        keypoint_names=tuple(labels.keypoint_names) if "keypoints" in task_list else (),
        depth="depth" in task_list, depth_log_mean=log_mean, depth_log_std=log_std)
    labeler = HypercolumnLabeler(config, seed=seed).to(device).train()
    targets = _Targets.create(maps, log_mean, log_std, device)
    sampler = _PixelSampler(targets, len(labels), resolution, ensemble, seed, class_balanced, config.keypoint_sigma)
    bank = feature_bank(G, ws, layer_list, resolution, device)
    _train(labeler, bank, sampler, targets, steps, batch_pixels, lr, progress, callback)
    labeler.eval()
    if config.keypoint_names:
        labeler.config = replace(config, keypoint_peak=_keypoint_peak(G, labeler, ws, maps.keypoints))
    return labeler


def _keypoint_peak(G: torch.nn.Module, labeler: HypercolumnLabeler, ws: Tensor, keypoints: np.ndarray) -> float:
    """Mean uncalibrated confidence (heatmap peak) at the visible training keypoints, in (0, 1]."""
    peaks = [labeler.predict(features).keypoints[..., 2]
             for _, _, features in synthesis_chunks(G, ws, batch_size=8)]
    visible = np.asarray(keypoints)[..., 2] > 0.5
    peak = float(np.concatenate(peaks)[visible].mean()) if visible.any() else 1.0
    return min(1.0, max(peak, 1e-3))


def _train(labeler: HypercolumnLabeler, bank: FeatureBank, sampler: _PixelSampler, targets: _Targets, steps: int,
           batch_pixels: int, lr: float, progress: bool,
           callback: Optional[Callable[[int, dict[str, float]], None]]) -> None:
    from tqdm import tqdm

    k, device = labeler.config.ensemble, bank.maps[0].device
    optimizer = torch.optim.Adam(labeler.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="fit-labeler", unit="step", disable=not progress)
    for step in bar:
        pixels = torch.stack([sampler.sample(m, batch_pixels) for m in range(k)]).to(device)  # [K, 3, P]
        rows = bank.gather(*pixels.transpose(0, 1).reshape(3, -1)).view(k, batch_pixels, -1)
        losses = _losses(labeler.forward_rows(rows), pixels, targets, labeler.config)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.sum().backward()
        optimizer.step()
        record = {name: float(v.detach().mean()) for name, v in {"loss": total, **losses}.items()}
        if not all(math.isfinite(v) for v in record.values()):
            raise HandsoffError(f"training diverged at step {step} (loss {record}); lower --lr")
        if callback is not None:
            callback(step, record)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix({name: f"{v:.3f}" for name, v in record.items()})
