"""StyleGAN2 residual discriminator (the NVlabs ``resnet`` architecture), written from its description.

Layout, for ``img_resolution`` R (a power of two >= 8)::

    bR     fromrgb (1x1 conv, lrelu) -> conv0 (3x3, lrelu) -> conv1 (3x3, lrelu, down 2)
           + skip (1x1, no bias, no activation, down 2); both branches scaled by sqrt(0.5)
    bR/2   conv0 -> conv1 (down) + skip (down)
    ...
    b8     ...
    b4     mbstd (minibatch standard deviation) -> conv (3x3, lrelu) -> fc (lrelu) -> out (1 logit)

Every learned layer uses equalized learning rate (weights stored N(0, 1), scaled by
1/sqrt(fan_in) at run time). Downsampling blurs with the [1, 3, 3, 1] FIR filter before a
stride-2 convolution. ``num_fp16_res`` top resolutions run in float16 on CUDA (never on
the CPU); ``conv_clamp`` clamps every convolution's output to +-conv_clamp (times the
layer's gain), which keeps float16 from overflowing.

Parameter and buffer names follow NVlabs stylegan2-ada-pytorch (``b64.fromrgb.weight``,
``b64.conv0.weight``, ``b64.conv1.bias``, ``b64.skip.weight``, ``b4.conv.weight``,
``b4.fc.weight``, ``b4.out.weight``, and the ``resample_filter`` buffers), so an
unconditional NVlabs discriminator's state dict loads with ``strict=True``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

import stylegan_ops

_LRELU_GAIN = math.sqrt(2.0)
_ACT_GAIN = {"linear": 1.0, "lrelu": _LRELU_GAIN}


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Hyper-parameters of :class:`Discriminator`.

    ``channels(res) = min(channel_base // res, channel_max)``, as in the generator.
    ``mbstd_group_size`` samples share one standard-deviation statistic (the per-device batch
    must be a multiple of ``min(mbstd_group_size, batch)``).
    """

    img_resolution: int = 64
    img_channels: int = 3
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    conv_clamp: Optional[float] = None
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    architecture: str = "resnet"
    fp16_channels_last: bool = False

    def __post_init__(self) -> None:
        r = self.img_resolution
        if r < 8 or r & (r - 1):
            raise ValueError(f"img_resolution must be a power of two >= 8, got {r}")
        if self.architecture != "resnet":
            raise ValueError(f"only the 'resnet' discriminator is implemented, got {self.architecture!r}")
        if self.mbstd_num_channels < 0 or self.mbstd_group_size < 0:
            raise ValueError("mbstd_group_size and mbstd_num_channels must be >= 0")

    # ----------------------------------------------------------------- derived
    @property
    def resolution_log2(self) -> int:
        return int(math.log2(self.img_resolution))

    @property
    def block_resolutions(self) -> List[int]:
        """Resolutions of the downsampling blocks, top first: ``[R, R/2, ..., 8]``."""
        return [2 ** i for i in range(self.resolution_log2, 2, -1)]

    @property
    def fp16_resolution(self) -> int:
        """Blocks at this resolution and above run in float16 on CUDA."""
        return max(2 ** (self.resolution_log2 + 1 - self.num_fp16_res), 8)

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    # ----------------------------------------------------------------- serialization
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DiscriminatorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiscriminatorConfig fields: {unknown}")
        return cls(**d)


def fp16_allowed(device: torch.device) -> bool:
    """float16 blocks run on CUDA only (the CPU always computes in float32)."""
    return device.type == "cuda"


# --------------------------------------------------------------------------- layers
class FullyConnectedLayer(nn.Module):
    """Dense layer with equalized learning rate: ``act(x @ (W * gain).T + b)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "linear", lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear":
            return F.linear(x, w, b)
        return stylegan_ops.bias_act(x.matmul(w.t()), b, act=self.activation, impl=impl)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Convolution with equalized learning rate, optional FIR-blurred 2x downsampling,
    bias + activation + clamp fused through ``stylegan_ops.bias_act``.

    With ``down=2`` the input is blurred with ``resample_filter`` (padded so the output is
    exactly half the input size) and then convolved with stride 2; a 1x1 layer blurs and
    decimates first, then applies the 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", down: int = 1, resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, channels_last: bool = False):
        super().__init__()
        if down not in (1, 2):
            raise ValueError("down must be 1 or 2")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.down = down
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.act_gain = _ACT_GAIN[activation]
        self.register_buffer("resample_filter", stylegan_ops.setup_filter(list(resample_filter)))
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0, impl: str = "auto") -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        if self.down == 1:
            x = F.conv2d(x, w, padding=self.padding)
        else:
            # Blur so that a stride-2 convolution (no padding) halves the size exactly:
            # filter taps fw=4, kernel k: pad (fw - 2 + 1) // 2 + k // 2 each side (NVlabs numbers).
            fw = self.resample_filter.shape[-1]
            p0 = self.padding + (fw - self.down + 1) // 2
            p1 = self.padding + (fw - self.down) // 2
            if self.kernel_size == 1:
                x = stylegan_ops.upfirdn2d(x, self.resample_filter, down=self.down, padding=[p0, p1, p0, p1],
                                           impl=impl)
                x = F.conv2d(x, w)
            else:
                x = stylegan_ops.upfirdn2d(x, self.resample_filter, padding=[p0, p1, p0, p1], impl=impl)
                x = F.conv2d(x, w, stride=self.down)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return stylegan_ops.bias_act(x, b, act=self.activation, gain=act_gain, clamp=act_clamp, impl=impl)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, activation={self.activation}, down={self.down}")


class DiscriminatorBlock(nn.Module):
    """One residual downsampling block (``b{res}``)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, use_fp16: bool, conv_clamp: Optional[float],
                 channels_last: bool = False, resample_filter=(1, 3, 3, 1)):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and channels_last
        self.register_buffer("resample_filter", stylegan_ops.setup_filter(list(resample_filter)))
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation="lrelu",
                                       conv_clamp=conv_clamp, channels_last=self.channels_last)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation="lrelu",
                                 conv_clamp=conv_clamp, channels_last=self.channels_last)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation="lrelu", down=2,
                                 resample_filter=resample_filter, conv_clamp=conv_clamp,
                                 channels_last=self.channels_last)
        self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor],
                force_fp32: bool = False, impl: str = "auto") -> torch.Tensor:
        ref = x if x is not None else img
        fp16 = self.use_fp16 and not force_fp32 and fp16_allowed(ref.device)
        # float32 unless float16 applies; float64 inputs stay float64 (for numerical checks)
        dtype = torch.float16 if fp16 else torch.promote_types(ref.dtype, torch.float32)
        memory_format = torch.channels_last if (fp16 and self.channels_last) else torch.contiguous_format
        if self.in_channels == 0:
            x = self.fromrgb(img.to(dtype=dtype, memory_format=memory_format), impl=impl)
        else:
            x = x.to(dtype=dtype, memory_format=memory_format)
        y = self.skip(x, gain=math.sqrt(0.5), impl=impl)
        x = self.conv0(x, impl=impl)
        x = self.conv1(x, gain=math.sqrt(0.5), impl=impl)
        return y.add_(x)


class MinibatchStdLayer(nn.Module):
    """Appends ``num_channels`` feature maps holding the standard deviation of the features
    over groups of ``group_size`` samples (sample i is grouped with i + N/G, i + 2N/G, ...)."""

    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        G = min(self.group_size, N) if self.group_size else N
        F_ = self.num_channels
        if N % G:
            raise ValueError(f"minibatch-stddev: batch {N} is not a multiple of the group size {G}")
        if C % F_:
            raise ValueError(f"minibatch-stddev: {C} channels are not a multiple of {F_}")
        y = x.reshape(G, N // G, F_, C // F_, H, W)
        y = y - y.mean(dim=0)
        y = y.square().mean(dim=0).add(1e-8).sqrt()         # [N/G, F, c, H, W]
        y = y.mean(dim=[2, 3, 4])                          # [N/G, F]
        y = y.reshape(N // G, F_, 1, 1).repeat(G, 1, H, W)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


class DiscriminatorEpilogue(nn.Module):
    """``b4``: minibatch stddev, 3x3 conv, fully connected, one logit per image."""

    def __init__(self, in_channels: int, resolution: int, mbstd_group_size: int, mbstd_num_channels: int,
                 conv_clamp: Optional[float]):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3,
                                activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1)

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        x = x.to(dtype=torch.promote_types(x.dtype, torch.float32), memory_format=torch.contiguous_format)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x, impl=impl)
        x = self.fc(x.flatten(1), impl=impl)
        return self.out(x, impl=impl)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator: images ``[N, C, R, R]`` in [-1, 1] -> logits ``[N, 1]``."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        self.img_resolution = config.img_resolution
        self.img_channels = config.img_channels
        self.block_resolutions = config.block_resolutions
        for res in self.block_resolutions:
            in_channels = config.channels(res) if res < config.img_resolution else 0
            block = DiscriminatorBlock(
                in_channels=in_channels, tmp_channels=config.channels(res), out_channels=config.channels(res // 2),
                resolution=res, img_channels=config.img_channels, use_fp16=res >= config.fp16_resolution,
                conv_clamp=config.conv_clamp, channels_last=config.fp16_channels_last)
            setattr(self, f"b{res}", block)
        self.b4 = DiscriminatorEpilogue(config.channels(4), resolution=4, mbstd_group_size=config.mbstd_group_size,
                                        mbstd_num_channels=config.mbstd_num_channels, conv_clamp=config.conv_clamp)

    def forward(self, img: torch.Tensor, c: Optional[torch.Tensor] = None, force_fp32: bool = False,
                impl: str = "auto", **_unused: Any) -> torch.Tensor:
        """Logits ``[N, 1]``. ``c`` is accepted for NVlabs call compatibility and ignored
        (unconditional); ``impl`` is passed to every `stylegan_ops` call ('ref' forces PyTorch)."""
        if img.ndim != 4 or img.shape[1:] != (self.img_channels, self.img_resolution, self.img_resolution):
            raise ValueError(f"expected images [N, {self.img_channels}, {self.img_resolution}, "
                             f"{self.img_resolution}], got {tuple(img.shape)}")
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img if x is None else None, force_fp32=force_fp32, impl=impl)
        return self.b4(x, impl=impl)

    def extra_repr(self) -> str:
        c = self.config
        return (f"img_resolution={c.img_resolution}, channel_base={c.channel_base}, channel_max={c.channel_max}, "
                f"num_fp16_res={c.num_fp16_res}, conv_clamp={c.conv_clamp}")


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


__all__ = [
    "DiscriminatorConfig", "Discriminator", "DiscriminatorBlock", "DiscriminatorEpilogue",
    "MinibatchStdLayer", "Conv2dLayer", "FullyConnectedLayer", "count_parameters",
]
