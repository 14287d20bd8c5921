"""Downstream models of the benchmark: a small UNet (default, from scratch or on a pretrained encoder) or DeepLabV3.

Every model maps a float image ``[N, 3, H, W]`` in [-1, 1] to ``[N, C, H, W]`` outputs at the
input resolution; the task decides what the channels mean (`handsoff.bench.tasks`).

* ``unet`` (default): four levels (three 2x poolings), two 3x3 conv-BN-ReLU per level,
  bilinear upsampling and skip concatenation. Width ``base`` doubles per level
  (``base=32``: 32, 64, 128, 256 channels, 1.9 M parameters). It suits 64x64 images on a CPU:
  measured on this project's 2-core machine it trains several times faster per image than
  DeepLabV3-MobileNetV3 at the same resolution (see `benchmarks/README.md`).
* ``unet`` with ``pretrained='vgg16'`` (`PretrainedUNet`): the same decoder on the first
  blocks of an ImageNet-pretrained VGG (`handsoff.bench.pretrained`), the papers'
  transfer-learning baseline.
* ``deeplabv3``: torchvision's DeepLabV3 with a MobileNetV3-Large backbone, random weights
  (``weights=None, weights_backbone=None``: nothing is downloaded). Its output stride of 16
  leaves a 4x4 map at 64x64, which is why it is not the default at small sizes.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from handsoff.bench.defaults import DEFAULT_PRETRAINED_BLOCKS, MODELS
from handsoff.errors import HandsoffError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["MODELS", "UNet", "PretrainedUNet", "OutputAffine", "build_model", "count_parameters"]



def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small UNet: ``levels`` resolutions, width ``base * 2**level``.

    Inputs whose sides are not multiples of ``2**(levels-1)`` work too: each decoder step
    resizes to the skip connection's exact size.
    """

    def __init__(self, out_channels: int, in_channels: int = 3, base: int = 32, levels: int = 4) -> None:
        super().__init__()
        if out_channels < 1 or base < 1 or levels < 1:
            raise ValueError(f"UNet needs out_channels, base and levels >= 1 (got {out_channels}, {base}, {levels})")
        widths = [base * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_conv_block(cin, w))
            cin = w
        self.up, self.head = _decoder(widths, widths, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


def _decoder(encoder_widths: list[int], decoder_widths: list[int], out_channels: int
             ) -> tuple[nn.ModuleList, nn.Conv2d]:
    """UNet decoder blocks, deepest first (upsampled input + skip -> ``decoder_widths[i]``), and the head."""
    up = nn.ModuleList()
    cin = encoder_widths[-1]
    for i in reversed(range(len(encoder_widths) - 1)):
        up.append(_conv_block(cin + encoder_widths[i], decoder_widths[i]))
        cin = decoder_widths[i]
    return up, nn.Conv2d(cin, out_channels, 1)


class PretrainedUNet(UNet):
    """A UNet whose encoder levels are the first blocks of an ImageNet-pretrained VGG.

    The decoder is the plain UNet's, width ``base * 2**level``, trained from scratch. Inputs in
    [-1, 1] are mapped to the ImageNet statistics the encoder was trained with.
    ``pretrained_parameters()`` are the encoder's, which training moves at a lower rate
    (`handsoff.bench.defaults.PRETRAINED_LR_FACTOR`).
    """

    def __init__(self, out_channels: int, encoder: nn.ModuleList, widths: list[int], base: int = 8,
                 source: str = "") -> None:
        nn.Module.__init__(self)
        if out_channels < 1 or base < 1 or len(encoder) != len(widths) or not widths:
            raise ValueError("PretrainedUNet needs out_channels, base >= 1 and one width per encoder block")
        from handsoff.bench.pretrained import IMAGENET_MEAN, IMAGENET_STD

        self.down = encoder
        self.up, self.head = _decoder(widths, [base * 2 ** i for i in range(len(widths))], out_channels)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(((x + 1) / 2 - self.mean) / self.std)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters (ImageNet weights at the start)."""
        return list(self.down.parameters())


class _DeepLabV3(nn.Module):
    """torchvision's DeepLabV3-MobileNetV3-Large returning the plain output tensor."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

        self.net = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=out_channels,
                                                aux_loss=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


class OutputAffine(nn.Module):
    """``scale * model(x) + shift``: puts a task's raw outputs on the scale of its targets."""

    def __init__(self, model: nn.Module, scale: float, shift: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale + self.shift


def build_model(task: str, out_channels: int, *, arch: str = "unet", base: int = 32, levels: int = 4,
                pretrained: Optional[str] = None, pretrained_weights: Optional[PathLike] = None,
                pretrained_blocks: int = DEFAULT_PRETRAINED_BLOCKS) -> nn.Module:
    """A freshly initialised downstream model for ``task`` with ``out_channels`` outputs per pixel.

    Args:
        task: 'seg', 'keypoints' or 'depth' (recorded on the module as ``task``; the
            architecture is the same for every task, only the output width differs).
        out_channels: classes (seg), keypoints (one heatmap each) or 1 (depth).
        arch: 'unet' or 'deeplabv3' (see the module docstring).
        base, levels: UNet width and depth (ignored for DeepLabV3; with ``pretrained`` the
            depth is ``pretrained_blocks`` and ``base`` the decoder's width).
        pretrained: an ImageNet encoder (`handsoff.bench.pretrained`, e.g. 'vgg16'): a
            `PretrainedUNet` (UNet only); None = everything from scratch.
        pretrained_weights: its weight file (None = search the usual places).
        pretrained_blocks: how many of the encoder's blocks to use.

    Initialisation uses torch's global generator: seed it (``torch.manual_seed``) first for
    reproducible weights.

    Raises:
        HandsoffError: ``pretrained`` weights not found, or a bad weight file (one line).
    """
    if task not in ("seg", "keypoints", "depth"):
        raise ValueError(f"unknown task {task!r}; expected 'seg', 'keypoints' or 'depth'")
    if pretrained is not None:
        if arch != "unet":
            raise HandsoffError(f"--pretrained {pretrained} builds a UNet; it does not combine with --model {arch}")
        from handsoff.bench.pretrained import pretrained_encoder

        encoder, widths, path = pretrained_encoder(pretrained, pretrained_blocks, pretrained_weights)
        model: nn.Module = PretrainedUNet(out_channels, encoder, widths, base=base, source=str(path))
    elif arch == "unet":
        model = UNet(out_channels, base=base, levels=levels)
    elif arch == "deeplabv3":
        model = _DeepLabV3(out_channels)
    else:
        raise ValueError(f"unknown model {arch!r}; expected one of {', '.join(MODELS)}")
    model.task = task
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
