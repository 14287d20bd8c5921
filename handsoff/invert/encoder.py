"""The GAN-inversion encoder: image -> W+ (pSp-like: a residual CNN with a feature pyramid).

Architecture (Richardson et al. 2021, "pixel2style2pixel", in small)::

    image [N,3,R,R] -> stem -> residual stages R, R/2, ..., c      (c = max(4, R/16))
    feature pyramid (top-down, like FPN) at c, 2c, 4c
    coarse ws  (0..2)  <- level c      each group: stride-2 convs down to 1x1, then a linear
    medium ws  (3..6)  <- level 2c     layer to (group size x w_dim)
    fine ws    (7.. )  <- level 4c
    ws = w_avg + w_scale * offsets

The offsets are predicted in units of ``w_scale`` (the RMS distance of the generator's ws from
``w_avg``), so the same learning rates work for any generator. Channels at resolution r are
``clip(channel_base // r, min_channels, max_channels)``: 16 at full resolution by default, so a
1024-pixel encoder stays affordable.

File format (`save_encoder`, `load_encoder`): safetensors weights, metadata ``format``
("handsoff-encoder"), ``version``, ``config`` (JSON of `EncoderConfig`), ``generator_digest``,
``num_ws``, ``w_dim``, ``resolution``, ``training`` (JSON training record).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from handsoff.errors import HandsoffError
from handsoff.utils.io import save_safetensors

__all__ = ["EncoderConfig", "Encoder", "save_encoder", "load_encoder", "read_encoder_metadata",
           "style_groups", "ENCODER_FORMAT"]

PathLike = Union[str, "os.PathLike[str]"]
ENCODER_FORMAT = "handsoff-encoder"
_VERSION = "1"
# pSp's split of W+ into coarse / medium / fine ws (3 and 4 ws, then the rest).
_GROUP_STARTS = (0, 3, 7)
_LRELU = 0.2


def style_groups(num_ws: int) -> list[range]:
    """Indices of the coarse, medium and fine ws (empty groups dropped), e.g. 10 -> [0:3, 3:7, 7:10]."""
    bounds = [min(s, num_ws) for s in _GROUP_STARTS] + [num_ws]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of an `Encoder`.

    Attributes:
        resolution: input images are ``[N, 3, resolution, resolution]`` (the generator's).
        num_ws: ws predicted per image (the generator's ``num_ws``).
        w_dim: size of each w.
        channel_base: channels at resolution r are ``clip(channel_base // r, min_channels,
            max_channels)``; None = ``16 * resolution``.
        min_channels, max_channels: bounds of the backbone's channels.
        fpn_channels: channels of the feature-pyramid levels.
        head_channels: channels of each group's head; None = ``min(w_dim, 256)``.
    """

    resolution: int
    num_ws: int
    w_dim: int
    channel_base: Optional[int] = None
    min_channels: int = 16
    max_channels: int = 256
    fpn_channels: int = 128
    head_channels: Optional[int] = None

    def __post_init__(self) -> None:
        r = self.resolution
        if r < 16 or r & (r - 1):
            raise ValueError(f"resolution must be a power of two >= 16, got {r}")
        if self.num_ws < 1 or self.w_dim < 1:
            raise ValueError(f"num_ws and w_dim must be positive, got {self.num_ws}, {self.w_dim}")
        if self.channel_base is None:
            object.__setattr__(self, "channel_base", 16 * r)
        if self.head_channels is None:
            object.__setattr__(self, "head_channels", min(self.w_dim, 256))

    def channels(self, res: int) -> int:
        return max(self.min_channels, min(self.max_channels, self.channel_base // res))

    @property
    def coarse_resolution(self) -> int:
        """The deepest pyramid level (pSp reads its coarse ws at 1/16 of the input size)."""
        return max(4, self.resolution // 16)

    @property
    def pyramid(self) -> list[int]:
        """Resolution of the pyramid level each style group reads, coarse first."""
        c = self.coarse_resolution
        return [min(c << i, self.resolution) for i in range(len(style_groups(self.num_ws)))]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown encoder config keys {unknown}")
        return cls(**d)


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    # He initialisation for leaky ReLU: torch's default shrinks the signal about 3x per layer, so
    # through ~15 layers without normalisation the output would not depend on the image at first.
    nn.init.kaiming_normal_(conv.weight, a=_LRELU, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return conv


class _ResBlock(nn.Module):
    """Pre-activation residual block; the sum is scaled by sqrt(1/2) to keep the variance steady."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = _conv(channels, channels)
        self.conv1 = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv0(F.leaky_relu(x, _LRELU))
        y = self.conv1(F.leaky_relu(y, _LRELU))
        return (x + y) * math.sqrt(0.5)


class _StyleHead(nn.Module):
    """A pyramid level ``[N, C, r, r]`` -> ``count`` w offsets: stride-2 convs to 1x1, then a linear layer."""

    def __init__(self, cin: int, channels: int, resolution: int, count: int, w_dim: int) -> None:
        super().__init__()
        convs = []
        for i in range(int(math.log2(resolution))):
            convs += [_conv(cin if i == 0 else channels, channels, stride=2), nn.LeakyReLU(_LRELU)]
        self.convs = nn.Sequential(*convs)
        self.linear = nn.Linear(channels, count * w_dim)
        # Start near w_avg: small offsets keep the first generator outputs sensible.
        with torch.no_grad():
            self.linear.weight.mul_(0.1)
            self.linear.bias.zero_()
        self.count, self.w_dim = count, w_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).flatten(1)).view(-1, self.count, self.w_dim)


class Encoder(nn.Module):
    """Image -> W+ codes of one generator.

    ``forward(img)`` takes float ``[N, 3, R, R]`` in [-1, 1] and returns float32
    ``[N, num_ws, w_dim]``. Buffers ``w_avg`` ``[w_dim]`` and ``w_scale`` (a scalar) are the
    generator's mean w and the RMS distance of its ws from that mean; `Encoder.for_generator`
    sets them. ``training_record`` (a dict) is what `save_encoder` stores as the training record.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.register_buffer("w_avg", torch.zeros(c.w_dim))
        self.register_buffer("w_scale", torch.ones(()))
        self.stem = _conv(3, c.channels(c.resolution))
        stages, downs = [], []
        res = c.resolution
        while res >= c.coarse_resolution:
            stages.append(_ResBlock(c.channels(res)))
            if res > c.coarse_resolution:
                downs.append(_conv(c.channels(res), c.channels(res // 2), stride=2))
            res //= 2
        self.stages = nn.ModuleList(stages)
        self.downs = nn.ModuleList(downs)
        groups = style_groups(c.num_ws)
        self.lateral = nn.ModuleList(_conv(c.channels(r), c.fpn_channels, kernel=1) for r in c.pyramid)
        self.heads = nn.ModuleList(_StyleHead(c.fpn_channels, c.head_channels, r, len(g), c.w_dim)
                                   for r, g in zip(c.pyramid, groups))
        self.training_record: dict[str, Any] = {}

    @classmethod
    def for_generator(cls, G: nn.Module, *, seed: int = 0, samples: int = 2048, **config: Any) -> "Encoder":
        """A new encoder sized for ``G`` (``config`` overrides `EncoderConfig` fields).

        ``w_scale`` is estimated from ``samples`` ws of ``G`` (psi 1) drawn with ``seed``.
        """
        encoder = cls(EncoderConfig(resolution=G.img_resolution, num_ws=G.num_ws, w_dim=G.w_dim, **config))
        device = G.mapping.w_avg.device
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            z = torch.randn(samples, G.z_dim, generator=gen).to(device)
            w = G.mapping(z, None)[:, 0]
            w_avg = G.mapping.w_avg.detach().float()
            encoder.w_avg.copy_(w_avg.cpu())
            encoder.w_scale.copy_((w - w_avg).square().mean().sqrt().cpu())
        return encoder.to(device)

    def _pyramid(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features at the pyramid resolutions, merged top-down; coarse first."""
        c = self.config
        x = self.stem(img)
        taps: dict[int, torch.Tensor] = {}
        res = c.resolution
        for i, stage in enumerate(self.stages):
            x = stage(x)
            taps[res] = x
            if i < len(self.downs):
                x = self.downs[i](F.leaky_relu(x, _LRELU))
            res //= 2
        levels: list[torch.Tensor] = []
        for lateral, r in zip(self.lateral, c.pyramid):
            p = lateral(taps[r])
            if levels:
                p = p + F.interpolate(levels[-1], size=p.shape[-2:], mode="bilinear", align_corners=False)
            levels.append(p)
        return levels

    def offsets(self, img: torch.Tensor) -> torch.Tensor:
        """``(ws - w_avg) / w_scale``, float ``[N, num_ws, w_dim]``."""
        c = self.config
        if img.ndim != 4 or tuple(img.shape[1:]) != (3, c.resolution, c.resolution):
            raise ValueError(f"images must be [N, 3, {c.resolution}, {c.resolution}], got {tuple(img.shape)}")
        levels = self._pyramid(img.float())
        return torch.cat([head(level) for head, level in zip(self.heads, levels)], dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.w_avg + self.w_scale * self.offsets(img)


# ---------------------------------------------------------------------------------------------
# File format

def _metadata(encoder: Encoder, digest: str) -> dict[str, str]:
    c = encoder.config
    return {"format": ENCODER_FORMAT, "version": _VERSION, "config": json.dumps(c.to_dict(), sort_keys=True),
            "generator_digest": digest, "num_ws": str(c.num_ws), "w_dim": str(c.w_dim),
            "resolution": str(c.resolution), "training": json.dumps(encoder.training_record, sort_keys=True)}


def save_encoder(path: PathLike, encoder: Encoder, G: nn.Module) -> Path:
    """Write ``encoder`` (made for generator ``G``) atomically to ``path`` (.safetensors)."""
    from handsoff.gan.digest import generator_digest

    c = encoder.config
    if (c.resolution, c.num_ws, c.w_dim) != (G.img_resolution, G.num_ws, G.w_dim):
        raise ValueError(f"encoder is for {c.resolution}px, num_ws {c.num_ws}, w_dim {c.w_dim}; the generator is "
                         f"{G.img_resolution}px, num_ws {G.num_ws}, w_dim {G.w_dim}")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder.state_dict().items()}
    save_safetensors(path, tensors, _metadata(encoder, generator_digest(G)))
    return Path(path)


def read_encoder_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata of an encoder file, JSON fields decoded (``config``, ``training``); nothing else loaded.

    Raises:
        HandsoffError: not a readable handsoff encoder file (one line naming ``path``).
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise HandsoffError(f"{p}: no such encoder file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise HandsoffError(f"{p}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if metadata.get("format") != ENCODER_FORMAT:
        raise HandsoffError(f"{p}: not a handsoff encoder file (train one with `handsoff fit-encoder`)")
    if metadata.get("version") != _VERSION:
        raise HandsoffError(f"{p}: encoder version {metadata.get('version')!r} is not supported (want {_VERSION})")
    try:
        metadata["config"] = EncoderConfig.from_dict(json.loads(metadata.get("config", "")))
        metadata["training"] = json.loads(metadata.get("training", "{}"))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise HandsoffError(f"{p}: corrupt encoder metadata ({' '.join(str(err).split())})") from None
    return metadata


def load_encoder(path: PathLike, G: Optional[nn.Module] = None,
                 device: Union[str, torch.device] = "cpu") -> Encoder:
    """Read an encoder file; with ``G``, refuse it unless it was made for ``G`` (same digest).

    Returns:
        The `Encoder` in eval mode, parameters not requiring gradients, on ``device``, with its
        ``training_record`` restored.

    Raises:
        HandsoffError: one line naming ``path``: unreadable, not an encoder, mis-shaped
            weights, or made for another generator.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    metadata = read_encoder_metadata(p)
    config: EncoderConfig = metadata["config"]
    if G is not None:
        from handsoff.gan.digest import generator_digest

        digest, want = metadata.get("generator_digest", ""), generator_digest(G)
        if digest != want:
            raise HandsoffError(f"{p}: made for another generator (digest {digest or 'missing'}, this generator is "
                                f"{want}); train an encoder for it with `handsoff fit-encoder`")
    encoder = Encoder(config)
    try:
        encoder.load_state_dict(load_file(str(p)), strict=True)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise HandsoffError(f"{p}: weights do not fit the encoder config ({str(err).splitlines()[0]})") from None
    encoder.training_record = metadata["training"] if isinstance(metadata["training"], dict) else {}
    return encoder.eval().requires_grad_(False).to(device)
