"""Downstream models that the benchmark trains from scratch: a small UNet (default) or DeepLabV3.

Every model maps a float image ``[N, 3, H, W]`` in [-1, 1] to ``[N, C, H, W]`` outputs at the
input resolution; the task decides what the channels mean (`handsoff.bench.tasks`).

* ``unet`` (default): four levels (three 2x poolings), two 3x3 conv-BN-ReLU per level,
  bilinear upsampling and skip concatenation. Width ``base`` doubles per level
  (``base=32``: 32, 64, 128, 256 channels, 1.9 M parameters). It suits 64x64 images on a CPU:
  measured on this project's 2-core machine it trains several times faster per image than
  DeepLabV3-MobileNetV3 at the same resolution (see `benchmarks/README.md`).
* ``deeplabv3``: torchvision's DeepLabV3 with a MobileNetV3-Large backbone, random weights
  (``weights=None, weights_backbone=None``: nothing is downloaded). Its output stride of 16
  leaves a 4x4 map at 64x64, which is why it is not the default at small sizes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from handsoff.bench.defaults import MODELS

__all__ = ["MODELS", "UNet", "OutputAffine", "build_model", "count_parameters"]



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
        self.up = nn.ModuleList(_conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels - 1)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

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


def build_model(task: str, out_channels: int, *, arch: str = "unet", base: int = 32, levels: int = 4) -> nn.Module:
    """A freshly initialised downstream model for ``task`` with ``out_channels`` outputs per pixel.

    Args:
        task: 'seg', 'keypoints' or 'depth' (recorded on the module as ``task``; the
            architecture is the same for every task, only the output width differs).
        out_channels: classes (seg), keypoints (one heatmap each) or 1 (depth).
        arch: 'unet' or 'deeplabv3' (see the module docstring).
        base, levels: UNet width and depth (ignored for DeepLabV3).

    Initialisation uses torch's global generator: seed it (``torch.manual_seed``) first for
    reproducible weights.
    """
    if task not in ("seg", "keypoints", "depth"):
        raise ValueError(f"unknown task {task!r}; expected 'seg', 'keypoints' or 'depth'")
    if arch == "unet":
        model: nn.Module = UNet(out_channels, base=base, levels=levels)
    elif arch == "deeplabv3":
        model = _DeepLabV3(out_channels)
    else:
        raise ValueError(f"unknown model {arch!r}; expected one of {', '.join(MODELS)}")
    model.task = task
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
