"""upfirdn2d: upsample, pad, FIR-filter and downsample a batch of 2-D images, and its helpers.

For each image plane, in this order:

1. upsample by inserting ``up - 1`` zeros after every sample (the result is ``H * up`` long),
2. pad with zeros (positive padding) or crop (negative padding),
3. convolve with the filter ``f`` (a true convolution; ``flip_filter=True`` correlates instead),
   scaled by ``gain``,
4. keep every ``down``-th sample, starting with the first.

Output size per axis: ``(in * up + pad0 + pad1 - taps) // down + 1``. The gradient of upfirdn2d is
upfirdn2d with up and down swapped and the filter flipped, so every derivative order reuses the
same op (and kernel).
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from types import ModuleType
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._dispatch import Impl, resolve

__all__ = ["upfirdn2d", "setup_filter", "filter2d", "upsample2d", "downsample2d"]

Scaling = Union[int, Sequence[int]]  # s or [sx, sy]
Padding = Union[int, Sequence[int]]  # p, [px, py] or [px0, px1, py0, py1]

# Largest filter (taps per axis) the kernels take; larger filters run on the reference path.
MAX_KERNEL_TAPS = 32
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Config:
    """One upfirdn2d configuration (hashable: it keys the cache of autograd Functions)."""

    up: Tuple[int, int]  # (x, y)
    down: Tuple[int, int]  # (x, y)
    pad: Tuple[int, int, int, int]  # (x0, x1, y0, y1)
    flip_filter: bool
    gain: float

    def transposed(self, taps: Tuple[int, int], in_size: Tuple[int, int], out_size: Tuple[int, int]) -> "_Config":
        """The configuration of the gradient: maps an output-shaped tensor to the input's shape.

        Forward output o reads the upsampled padded input at o*down - pad0 + t for taps t, so the
        transpose correlates the flipped filter over the gradient upsampled by ``down``, padded by
        ``taps - 1 - pad0`` in front, and just enough behind to end at the last input sample.

        Args:
            taps: filter size (fw, fh); in_size: input (W, H); out_size: output (W, H).
        """
        (ux, uy), (dx, dy), (px0, px1, py0, py1) = self.up, self.down, self.pad
        (fw, fh), (iw, ih), (ow, oh) = taps, in_size, out_size
        pad = (
            fw - 1 - px0,
            iw * ux - ow * dx + px0 - ux + 1,
            fh - 1 - py0,
            ih * uy - oh * dy + py0 - uy + 1,
        )
        return _Config(self.down, self.up, pad, not self.flip_filter, self.gain)


def upfirdn2d(
    x: torch.Tensor,
    f: Optional[torch.Tensor],
    up: Scaling = 1,
    down: Scaling = 1,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Upsample, pad/crop, FIR-filter and downsample ``x`` (see the module docstring).

    Args:
        x: images ``[N, C, H, W]``, floating point.
        f: filter ``[fh, fw]``, or ``[fw]`` for a separable filter applied along both axes, or None
            for the identity ``[[1]]``; float32 as made by :func:`setup_filter` (cast to x.dtype
            on the reference path, used in float32 by the kernels; float64 for float64 x).
        up: upsampling factor, int or ``[x, y]``, >= 1.
        down: downsampling factor, int or ``[x, y]``, >= 1.
        padding: int, ``[x, y]`` or ``[x0, x1, y0, y1]``; negative values crop. Applied after
            upsampling, in upsampled samples.
        flip_filter: False: convolve with f; True: correlate with f.
        gain: overall scale of the output (each axis of a separable filter takes sqrt(gain)).
        impl: 'ref', 'cuda', 'cpu' or 'auto'. On the CPU, 'auto' runs the reference (a strided
            depthwise conv2d), the fastest CPU path; 'cpu' runs the CUDA kernel's tile algorithm
            compiled for the CPU (what the tests use to check it without a GPU). The kernels take
            filters up to ``MAX_KERNEL_TAPS`` per axis that need no gradient; other calls run on
            the reference path.

    Returns:
        ``[N, C, (H*up_y + pad_y0 + pad_y1 - fh) // down_y + 1, (W*up_x + pad_x0 + pad_x1 - fw) // down_x + 1]``.
    """
    cfg = _Config(
        up=_parse_scaling(up, "up"),
        down=_parse_scaling(down, "down"),
        pad=_parse_padding(padding),
        flip_filter=bool(flip_filter),
        gain=float(gain),
    )
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f"f must be a non-empty 1-D or 2-D filter, got shape {list(f.shape)}")
    _check_output_size(x, f, cfg)
    kernel = resolve("upfirdn2d", impl, x.device)
    if kernel is not None and _kernel_supports(x, f):
        return _compiled_function(kernel, cfg).apply(x, f)
    return _upfirdn2d_ref(x, f, cfg)


def setup_filter(
    f: Union[torch.Tensor, Sequence, float, int, None],
    device: torch.device = torch.device("cpu"),
    normalize: bool = True,
    flip_filter: bool = False,
    gain: float = 1,
    separable: Optional[bool] = None,
) -> torch.Tensor:
    """Make a float32 filter for :func:`upfirdn2d` from a list, array or tensor.

    Args:
        f: None (the identity ``[1]``), a scalar, ``[taps]`` (made 2-D by an outer product unless
            separable), or ``[fh, fw]``.
        device: where the result goes.
        normalize: scale so that the taps sum to 1 (the result is then further scaled by gain).
        flip_filter: flip along every axis.
        gain: overall gain; a separable filter takes ``sqrt(gain)`` (it is applied once per axis).
        separable: keep a 1-D filter 1-D (applied along both axes). Default: only 1-D filters of 8
            or more taps, where two 1-D passes beat one 2-D pass.

    Returns:
        ``[taps]`` if separable, else ``[fh, fw]``, float32. The input is never modified.
    """
    f = torch.as_tensor(1.0 if f is None else f, dtype=torch.float32)
    if f.ndim > 2 or f.numel() == 0:
        raise ValueError(f"f must be a scalar, 1-D or 2-D and non-empty, got shape {list(f.shape)}")
    if f.ndim == 0:
        f = f.reshape(1)
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if f.ndim != (1 if separable else 2):
        raise ValueError("a separable filter must be 1-D")
    if normalize:
        f = f / f.sum()  # out of place: as_tensor may share memory with the caller's tensor
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def filter2d(
    x: torch.Tensor,
    f: Optional[torch.Tensor],
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Filter ``x`` with ``f``, padded so that the output has the input's size (plus ``padding``).

    Args and returns as :func:`upfirdn2d` with up = down = 1; output ``[N, C, H + py0 + py1,
    W + px0 + px1]``.
    """
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    pad = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=pad, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(
    x: torch.Tensor,
    f: Optional[torch.Tensor],
    up: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Upsample ``x`` by ``up`` with the interpolation filter ``f``.

    The gain is multiplied by ``up_x * up_y`` to keep the mean (zero insertion divides it by that),
    and the padding centres the filter so that the output is ``[N, C, H * up_y + py0 + py1,
    W * up_x + px0 + px1]``. Args as :func:`upfirdn2d`.
    """
    ux, uy = _parse_scaling(up, "up")
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    pad = [
        px0 + (fw + ux - 1) // 2,
        px1 + (fw - ux) // 2,
        py0 + (fh + uy - 1) // 2,
        py1 + (fh - uy) // 2,
    ]
    return upfirdn2d(x, f, up=(ux, uy), padding=pad, flip_filter=flip_filter, gain=gain * ux * uy, impl=impl)


def downsample2d(
    x: torch.Tensor,
    f: Optional[torch.Tensor],
    down: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Downsample ``x`` by ``down`` after low-pass filtering with ``f``.

    The padding centres the filter so that the output is ``[N, C, (H + py0 + py1) // down_y,
    (W + px0 + px1) // down_x]``. Args as :func:`upfirdn2d`.
    """
    dx, dy = _parse_scaling(down, "down")
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    pad = [
        px0 + (fw - dx + 1) // 2,
        px1 + (fw - dx) // 2,
        py0 + (fh - dy + 1) // 2,
        py1 + (fh - dy) // 2,
    ]
    return upfirdn2d(x, f, down=(dx, dy), padding=pad, flip_filter=flip_filter, gain=gain, impl=impl)


def _parse_scaling(s: Scaling, name: str) -> Tuple[int, int]:
    """int or [x, y] -> (x, y), each an int >= 1."""
    values = (s, s) if isinstance(s, numbers.Integral) else tuple(s)
    if len(values) != 2 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in values):
        raise ValueError(f"{name} must be an int >= 1 or a pair of them, got {s!r}")
    return int(values[0]), int(values[1])


def _parse_padding(p: Padding) -> Tuple[int, int, int, int]:
    """int, [x, y] or [x0, x1, y0, y1] -> (x0, x1, y0, y1)."""
    values = (p,) if isinstance(p, numbers.Integral) else tuple(p)
    if not all(isinstance(v, numbers.Integral) for v in values) or len(values) not in (1, 2, 4):
        raise ValueError(f"padding must be an int, [x, y] or [x0, x1, y0, y1] of ints, got {p!r}")
    values = tuple(int(v) for v in values)
    if len(values) == 1:
        return (values[0],) * 4  # type: ignore[return-value]
    if len(values) == 2:
        return (values[0], values[0], values[1], values[1])
    return values  # type: ignore[return-value]


def _filter_size(f: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(fw, fh) of a 2-D or separable filter; (1, 1) for None."""
    if f is None:
        return 1, 1
    if f.ndim not in (1, 2):
        raise ValueError(f"f must be 1-D or 2-D, got shape {list(f.shape)}")
    return int(f.shape[-1]), int(f.shape[0])


def _check_output_size(x: torch.Tensor, f: torch.Tensor, cfg: _Config) -> None:
    (fw, fh), (ux, uy), (dx, dy), (px0, px1, py0, py1) = _filter_size(f), cfg.up, cfg.down, cfg.pad
    h, w = x.shape[2] * uy + py0 + py1, x.shape[3] * ux + px0 + px1
    if h < fh or w < fw:
        raise ValueError(
            f"upfirdn2d: the upsampled, padded input ({h}x{w}) is smaller than the {fh}x{fw} filter"
        )


def _kernel_supports(x: torch.Tensor, f: torch.Tensor) -> bool:
    """Whether the kernels cover this call (else the reference runs, see upfirdn2d)."""
    return x.dtype in _KERNEL_DTYPES and max(f.shape) <= MAX_KERNEL_TAPS and not f.requires_grad


def _upfirdn2d_ref(x: torch.Tensor, f: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """Plain PyTorch: autograd provides every derivative (for f too)."""
    n, c, h, w = x.shape
    (ux, uy), (dx, dy) = cfg.up, cfg.down
    if ux > 1 or uy > 1:  # zero insertion: each sample followed by up - 1 zeros
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, ux - 1, 0, 0, 0, uy - 1])
        x = x.reshape(n, c, h * uy, w * ux)
    if any(cfg.pad):
        x = F.pad(x, list(cfg.pad))  # negative entries crop
    f = (f * cfg.gain ** (f.ndim / 2)).to(x.dtype)
    if not cfg.flip_filter:
        f = f.flip(list(range(f.ndim)))  # conv2d correlates; the flipped filter makes it convolve
    # Striding the convolution computes only the samples that downsampling keeps.
    if f.ndim == 2:
        return F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), stride=(dy, dx), groups=c)
    x = F.conv2d(x, f.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1), stride=(1, dx), groups=c)
    return F.conv2d(x, f.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1), stride=(dy, 1), groups=c)


@functools.lru_cache(maxsize=None)
def _compiled_function(kernel: ModuleType, cfg: _Config) -> type:
    """An autograd Function for one configuration on a compiled kernel, cached per configuration.

    ``apply(x, f)``; f is a constant (no gradient). Its backward is the Function of the
    transposed configuration, so second and higher derivatives come for free.
    """
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = cfg.up, cfg.down, cfg.pad

    class Upfirdn2d(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            y = kernel.upfirdn2d(x, f, ux, uy, dx, dy, px0, px1, py0, py1, cfg.flip_filter, cfg.gain)
            ctx.save_for_backward(f)
            ctx.sizes = (_filter_size(f), (x.shape[3], x.shape[2]), (y.shape[3], y.shape[2]))
            return y

        @staticmethod
        def backward(ctx, dy_out: torch.Tensor):
            (f,) = ctx.saved_tensors
            dx_in = None
            if ctx.needs_input_grad[0]:
                dx_in = _compiled_function(kernel, cfg.transposed(*ctx.sizes)).apply(dy_out, f)
            return dx_in, None

    return Upfirdn2d
