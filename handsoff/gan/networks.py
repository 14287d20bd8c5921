"""StyleGAN2 generator: mapping network + synthesis network.

Parameter names, shapes and semantics are those of NVlabs stylegan2-ada-pytorch
(`training/networks.py`, `Generator`), so its `state_dict()` loads here with
`load_state_dict(strict=True)` and gives the same images. The code is this project's
own; the module layout follows rosinality/stylegan2-pytorch's small modules.

Conventions:
    * Equalized learning rate: stored weights are N(0, 1) (divided by the learning-rate
      multiplier) and scaled at run time (`weight_gain`, `bias_gain`).
    * Images and feature maps are NCHW. `ws` is `[N, num_ws, w_dim]`.
    * `impl` is passed to every `stylegan_ops` call ('ref' forces the PyTorch reference
      path, 'auto' lets the ops pick their compiled kernels when available).
    * float16 runs only on CUDA, for the `num_fp16_res` highest resolutions, unless
      `force_fp32`; returned images and features are always float32.
    * On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default
      (`torch.backends.cudnn.allow_tf32`), which moves outputs by ~1e-3; this module
      leaves that global setting to the caller (NVlabs turns it off in training).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from stylegan_ops import bias_act, setup_filter, upfirdn2d, upsample2d

from .config import GeneratorConfig

__all__ = [
    "FullyConnectedLayer",
    "MappingNetwork",
    "SynthesisLayer",
    "ToRGBLayer",
    "SynthesisBlock",
    "SynthesisNetwork",
    "Generator",
    "normalize_2nd_moment",
    "modulated_conv2d",
    "conv2d_resample",
    "NOISE_MODES",
]

NOISE_MODES = ("random", "const", "none")
"""Accepted `noise_mode` values: fresh N(0,1) noise per call, the stored `noise_const`
buffers, or no noise at all."""

_LRELU_GAIN = math.sqrt(2.0)
_DEFAULT_RESAMPLE_FILTER = (1, 3, 3, 1)

Padding = Union[int, Sequence[int]]


def _check_noise_mode(noise_mode: str) -> None:
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")


# ----------------------------------------------------------------------------------------
# Functional building blocks


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale `x` to unit mean square along `dim` (StyleGAN's PixelNorm on z)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _padding4(padding: Padding) -> List[int]:
    """`int`, `[x, y]` or `[x0, x1, y0, y1]` -> `[x0, x1, y0, y1]`."""
    if isinstance(padding, int):
        return [padding] * 4
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        return [padding[0], padding[0], padding[1], padding[1]]
    if len(padding) == 4:
        return padding
    raise ValueError(f"padding must be an int or have 2 or 4 entries, got {padding}")


def _conv2d(x: torch.Tensor, w: torch.Tensor, *, stride: int = 1, padding: int = 0, groups: int = 1,
            flip_weight: bool = True) -> torch.Tensor:
    """`F.conv2d`; `flip_weight=False` flips the kernel, i.e. true convolution instead of correlation."""
    if not flip_weight:
        w = w.flip([2, 3])
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _transposed_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Re-layout a conv2d weight `[G*O, I, k, k]` for `conv_transpose2d` (`[G*I, O, k, k]`)."""
    out_channels, in_per_group, kh, kw = w.shape
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    return w.reshape(groups * in_per_group, out_channels // groups, kh, kw)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, *, up: int = 1,
                    down: int = 1, padding: Padding = 0, groups: int = 1, flip_weight: bool = True,
                    impl: str = "auto") -> torch.Tensor:
    """2D convolution with optional FIR-filtered up- or downsampling (NVlabs semantics).

    Up (`up > 1`): the result equals `upfirdn2d(x, f, up=up, padding=p', gain=up**2)`
    followed by a 'valid' convolution with `w`, where `p'` extends `padding` by the
    filter's centring (`(fw + up - 1) // 2` before, `(fw - up) // 2` after). It is computed
    as a strided transposed convolution followed by the FIR filter, so no zeros are
    multiplied by the kernel.

    Down (`down > 1`): FIR filter (padding extended by `(fw - down + 1) // 2` before,
    `(fw - down) // 2` after), then a convolution with stride `down`.

    Args:
        x: Input `[N, groups*I, H, W]`.
        w: Weight `[groups*O, I, kh, kw]`.
        f: FIR filter from `setup_filter` (required when resampling).
        up: Integer upsampling factor.
        down: Integer downsampling factor (not combined with `up`).
        padding: Padding of the (resampled) input before the convolution.
        groups: Convolution groups.
        flip_weight: True = correlation (what `F.conv2d` computes), False = true convolution.
        impl: Implementation of the `stylegan_ops` calls.
    """
    if up > 1 and down > 1:
        raise NotImplementedError("conv2d_resample: combined up- and downsampling is not supported")
    if (up > 1 or down > 1) and f is None:
        raise ValueError("conv2d_resample: a resampling filter is required when up > 1 or down > 1")
    kh, kw = w.shape[2], w.shape[3]
    px0, px1, py0, py1 = _padding4(padding)

    if up == 1 and down == 1:
        if px0 == px1 == py0 == py1 and px0 >= 0:
            return _conv2d(x, w, padding=px0, groups=groups, flip_weight=flip_weight)
        x = F.pad(x, [px0, px1, py0, py1])  # negative entries crop
        return _conv2d(x, w, groups=groups, flip_weight=flip_weight)

    fh, fw = f.shape[0], f.shape[-1]
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
        if kh == 1 and kw == 1:
            x = _conv2d(x, w, groups=groups, flip_weight=flip_weight)
            return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, impl=impl)
        # A stride-`up` transposed convolution equals zero insertion followed by a full
        # true convolution, minus `up - 1` trailing zero rows/columns; the FIR padding
        # below absorbs the difference between 'full' and 'valid'.
        if flip_weight:
            w = w.flip([2, 3])
        x = F.conv_transpose2d(x, _transposed_weight(w, groups), stride=up, groups=groups)
        pad = [px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)]
        return upfirdn2d(x, f, padding=pad, gain=up ** 2, impl=impl)

    px0 += (fw - down + 1) // 2
    px1 += (fw - down) // 2
    py0 += (fh - down + 1) // 2
    py1 += (fh - down) // 2
    if kh == 1 and kw == 1:
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], impl=impl)
        return _conv2d(x, w, groups=groups, flip_weight=flip_weight)
    x = upfirdn2d(x, f, padding=[px0, px1, py0, py1], impl=impl)
    return _conv2d(x, w, stride=down, groups=groups, flip_weight=flip_weight)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     noise: Optional[torch.Tensor] = None, up: int = 1, padding: Padding = 0,
                     resample_filter: Optional[torch.Tensor] = None, demodulate: bool = True,
                     flip_weight: bool = True, fused_modconv: bool = True, impl: str = "auto") -> torch.Tensor:
    """StyleGAN2 modulated convolution, with optional demodulation and additive noise.

    Per sample n: `w'[o,i] = weight[o,i] * styles[n,i]`; with `demodulate`,
    `w''[o,i] = w'[o,i] / sqrt(sum_{i,kh,kw} w'[o,i]^2 + 1e-8)`; output
    `conv2d_resample(x[n], w'') + noise`.

    Args:
        x: Input `[N, I, H, W]` (float32 or float16).
        weight: Shared weight `[O, I, k, k]`.
        styles: Per-sample modulation `[N, I]` (float32).
        noise: Optional noise broadcastable to `[N, O, H', W']`, added after demodulation.
        up: Upsampling factor (1 or 2).
        padding: Convolution padding.
        resample_filter: FIR filter for upsampling.
        demodulate: Normalize each output channel's effective weight.
        flip_weight: See `conv2d_resample`.
        fused_modconv: True = one grouped convolution with per-sample weights; False =
            scale activations before and after a shared-weight convolution (faster in
            training and for float16 batches).
        impl: Implementation of the `stylegan_ops` calls.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape

    # Pre-normalize so that float16 activations cannot overflow; demodulation undoes it.
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / math.sqrt(in_channels * kh * kw)
                           / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)

    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N, O]

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding,
                            flip_weight=flip_weight, impl=impl)
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    if dcoefs is not None:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), resample_filter, up=up, padding=padding, groups=batch_size,
                        flip_weight=flip_weight, impl=impl)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


# ----------------------------------------------------------------------------------------
# Mapping network


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalized learning rate and an optional bias_act activation.

    Stored `weight` is `[out, in]`, initialised N(0, 1) / lr_multiplier; applied as
    `weight * lr_multiplier / sqrt(in)`. Stored `bias` is applied as `bias * lr_multiplier`.
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation, impl=impl)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class MappingNetwork(nn.Module):
    """z (and optional label c) -> w, broadcast to `num_ws` copies, with truncation.

    z is normalized to unit second moment; c is embedded by a linear layer (`embed`) and
    normalized likewise, then concatenated. `num_layers` lrelu layers `fc0..fc{L-1}` map
    to w. The buffer `w_avg` tracks the mean w (exponential moving average with decay
    `w_avg_beta`, updated only when `update_emas=True`) and is the truncation centre.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, *, num_layers: int = 8,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.998) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        features = [z_dim + embed_features] + [w_dim] * num_layers
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation="lrelu",
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def _embed_inputs(self, z: Optional[torch.Tensor], c: Optional[torch.Tensor], impl: str) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"z must be [N, {self.z_dim}], got {None if z is None else tuple(z.shape)}")
            parts.append(normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(f"c must be [N, {self.c_dim}], got {None if c is None else tuple(c.shape)}")
            parts.append(normalize_2nd_moment(self.embed(c.to(torch.float32), impl=impl)))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, z: Optional[torch.Tensor], c: Optional[torch.Tensor] = None, truncation_psi: float = 1.0,
                truncation_cutoff: Optional[int] = None, update_emas: bool = False,
                impl: str = "auto") -> torch.Tensor:
        """Map latents to `ws` `[N, num_ws, w_dim]` (float32).

        Args:
            z: Latents `[N, z_dim]`.
            c: Labels `[N, c_dim]`; ignored (may be None) when `c_dim == 0`.
            truncation_psi: `w <- w_avg + psi * (w - w_avg)`; 1 disables truncation.
            truncation_cutoff: Truncate only the first `truncation_cutoff` ws (None = all).
            update_emas: Update `w_avg` with this batch's mean w (before truncation).
            impl: Implementation of the `stylegan_ops` calls.
        """
        x = self._embed_inputs(z, c, impl)
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x, impl=impl)
        if update_emas:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


# ----------------------------------------------------------------------------------------
# Synthesis network


class SynthesisLayer(nn.Module):
    """Modulated (demodulated) 3x3 convolution + noise + bias + lrelu, optionally upsampling 2x.

    Parameters/buffers (NVlabs names): `affine` (w -> styles, bias init 1), `weight`
    `[O, I, k, k]`, `bias` `[O]`, `noise_strength` (scalar), `noise_const` `[res, res]`,
    `resample_filter` (4x4, present even when `up == 1`). The output is
    `clamp(lrelu(conv + noise + bias) * sqrt(2) * gain, +-conv_clamp * gain)`.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *,
                 kernel_size: int = 3, up: int = 1, conv_clamp: Optional[float] = None,
                 resample_filter: Sequence[int] = _DEFAULT_RESAMPLE_FILTER) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def _noise(self, x: torch.Tensor, noise_mode: str) -> Optional[torch.Tensor]:
        if noise_mode == "random":
            shape = [x.shape[0], 1, self.resolution, self.resolution]
            return torch.randn(shape, device=x.device) * self.noise_strength
        if noise_mode == "const":
            return self.noise_const * self.noise_strength
        return None

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, noise_mode: str = "const", fused_modconv: bool = True,
                gain: float = 1.0, impl: str = "auto") -> torch.Tensor:
        """`x` `[N, I, res/up, res/up]`, `w` `[N, w_dim]` -> `[N, O, res, res]` in `x.dtype`."""
        _check_noise_mode(noise_mode)
        styles = self.affine(w, impl=impl)
        x = modulated_conv2d(x, self.weight, styles, noise=self._noise(x, noise_mode), up=self.up,
                             padding=self.padding, resample_filter=self.resample_filter,
                             flip_weight=(self.up == 1), fused_modconv=fused_modconv, impl=impl)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act="lrelu", gain=_LRELU_GAIN * gain, clamp=clamp, impl=impl)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"resolution={self.resolution}, up={self.up}")


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution without demodulation, + bias, linear (clamped to +-conv_clamp).

    Styles are scaled by `1 / sqrt(in_channels * k * k)` (equalized learning rate).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, kernel_size: int = 1,
                 conv_clamp: Optional[float] = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, fused_modconv: bool = True,
                impl: str = "auto") -> torch.Tensor:
        styles = self.affine(w, impl=impl) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv, impl=impl)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp, impl=impl)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network ('skip' architecture).

    The 4x4 block starts from the learned `const`; higher blocks upsample with `conv0`.
    Then `conv1`, and `torgb` whose output is added to the 2x-upsampled image of the
    previous block. Consumes `num_conv + num_torgb` ws; the toRGB w is shared with the
    next block's first conv.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int, *,
                 use_fp16: bool = False, conv_clamp: Optional[float] = None,
                 resample_filter: Sequence[int] = _DEFAULT_RESAMPLE_FILTER) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        conv_clamp=conv_clamp, resample_filter=resample_filter)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution,
                                    conv_clamp=conv_clamp, resample_filter=resample_filter)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def convs(self) -> List[SynthesisLayer]:
        """The block's synthesis convolutions, in execution order."""
        return [self.conv1] if self.in_channels == 0 else [self.conv0, self.conv1]

    def compute_dtype(self, device: torch.device, force_fp32: bool) -> torch.dtype:
        """float16 for fp16 blocks on CUDA unless forced to float32; float32 otherwise."""
        if self.use_fp16 and not force_fp32 and device.type == "cuda":
            return torch.float16
        return torch.float32

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor], ws: torch.Tensor, *,
                noise_mode: str = "const", force_fp32: bool = False, fused_modconv: Optional[bool] = None,
                impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Run the block.

        Args:
            x: Features of the previous block (None for the 4x4 block).
            img: Image of the previous block, float32 (None for the 4x4 block).
            ws: `[N, num_conv + num_torgb, w_dim]`.

        Returns:
            `(x, img, conv_outputs)`: features in the block's compute dtype, the float32
            image at this resolution, and each conv's output (compute dtype).
        """
        dtype = self.compute_dtype(ws.device, force_fp32)
        if fused_modconv is None:
            fused_modconv = (not self.training) and (dtype == torch.float32 or ws.shape[0] == 1)
        w_iter = iter(ws.unbind(dim=1))

        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            x = x.to(dtype)
        outputs = []
        for conv in self.convs():
            x = conv(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv, impl=impl)
            outputs.append(x)

        if img is not None:
            img = upsample2d(img, self.resample_filter, impl=impl)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv, impl=impl).to(torch.float32)
        img = y if img is None else img + y
        return x, img, outputs


class SynthesisNetwork(nn.Module):
    """ws `[N, num_ws, w_dim]` -> image `[N, img_channels, R, R]` through blocks `b4 ... b{R}`."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.w_dim = config.w_dim
        self.img_resolution = config.img_resolution
        self.img_channels = config.img_channels
        self.block_resolutions = config.block_resolutions
        self.num_ws = config.num_ws
        for res in self.block_resolutions:
            block = SynthesisBlock(
                in_channels=config.channels(res // 2) if res > 4 else 0,
                out_channels=config.channels(res),
                w_dim=config.w_dim,
                resolution=res,
                img_channels=config.img_channels,
                use_fp16=res >= config.fp16_resolution,
                conv_clamp=config.conv_clamp,
            )
            setattr(self, f"b{res}", block)

    def blocks(self) -> List[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def feature_shapes(self) -> List[Tuple[int, int]]:
        """`(channels, resolution)` of each feature map `forward(..., return_features=True)` returns."""
        return [(conv.out_channels, conv.resolution) for block in self.blocks() for conv in block.convs()]

    def _split_ws(self, ws: torch.Tensor) -> List[torch.Tensor]:
        """Slice ws per block: each block's toRGB shares its w with the next block's first conv."""
        out, start = [], 0
        for block in self.blocks():
            out.append(ws.narrow(1, start, block.num_conv + block.num_torgb))
            start += block.num_conv
        return out

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", force_fp32: bool = False, impl: str = "auto",
                return_features: bool = False, fused_modconv: Optional[bool] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Synthesize images from ws.

        Args:
            ws: `[N, num_ws, w_dim]`.
            noise_mode: 'const' (stored noise buffers; deterministic, the default here),
                'random' (fresh noise each call; use in training) or 'none'.
            force_fp32: Run every block in float32 even on CUDA.
            impl: Implementation of the `stylegan_ops` calls ('auto', 'ref', ...).
            return_features: Also return the output of every synthesis convolution
                (`b4.conv1`, then `conv0`, `conv1` of each higher block), as float32, after
                bias, activation and clamping; toRGB outputs are not included.
            fused_modconv: Force the grouped (True) or activation-scaling (False)
                modulated convolution; None = NVlabs' choice (fused in eval mode for
                float32 or batch 1).

        Returns:
            The float32 image `[N, img_channels, R, R]`, or `(image, features)`.
        """
        _check_noise_mode(noise_mode)
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        features: List[torch.Tensor] = []
        for block, block_ws in zip(self.blocks(), self._split_ws(ws)):
            x, img, outputs = block(x, img, block_ws, noise_mode=noise_mode, force_fp32=force_fp32,
                                    fused_modconv=fused_modconv, impl=impl)
            if return_features:
                features.extend(o.to(torch.float32) for o in outputs)
        if return_features:
            return img, features
        return img


# ----------------------------------------------------------------------------------------
# Generator


class Generator(nn.Module):
    """StyleGAN2 generator: `mapping` (z -> ws) followed by `synthesis` (ws -> image).

    `state_dict()` keys, shapes and semantics equal NVlabs stylegan2-ada-pytorch's
    `Generator`, so its weights load with `load_state_dict(..., strict=True)`.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        self.c_dim = config.c_dim
        self.w_dim = config.w_dim
        self.img_resolution = config.img_resolution
        self.img_channels = config.img_channels
        self.synthesis = SynthesisNetwork(config)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(config.z_dim, config.c_dim, config.w_dim, self.num_ws,
                                      num_layers=config.mapping_layers,
                                      lr_multiplier=config.mapping_lr_multiplier,
                                      w_avg_beta=config.w_avg_beta)

    def feature_shapes(self) -> List[Tuple[int, int]]:
        """`(channels, resolution)` of each feature returned by `synthesis(..., return_features=True)`."""
        return self.synthesis.feature_shapes()

    def forward(self, z: torch.Tensor, c: Optional[torch.Tensor] = None, truncation_psi: float = 1.0,
                truncation_cutoff: Optional[int] = None, noise_mode: str = "const", update_emas: bool = False,
                force_fp32: bool = False, impl: str = "auto", fused_modconv: Optional[bool] = None) -> torch.Tensor:
        """`synthesis(mapping(z, c, ...), ...)`: latents `[N, z_dim]` -> float32 images `[N, C, R, R]`."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas, impl=impl)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, impl=impl,
                              fused_modconv=fused_modconv)
