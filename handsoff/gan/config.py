"""Hyper-parameters of the StyleGAN2 generator.

`GeneratorConfig` is the single description of a generator's architecture: it is what
`handsoff.gan.networks.Generator` is built from, what checkpoints store (`to_dict`)
and what foreign checkpoints are translated into (`from_nvlabs_init_kwargs`).

The architecture follows NVlabs stylegan2-ada-pytorch (`training/networks.py`,
configuration "stylegan2"): a mapping network of `mapping_layers` fully connected
layers, then synthesis blocks at resolutions 4, 8, ..., `img_resolution`, each with
two 3x3 modulated convolutions (one at 4x4) and a toRGB layer whose outputs are
upsampled and summed ("skip" architecture).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

__all__ = ["GeneratorConfig", "CONFIG_VERSION"]

CONFIG_VERSION = 1
"""Version of the dictionary layout written by `GeneratorConfig.to_dict`."""

_SUPPORTED_ARCHITECTURES = ("skip",)
_MIN_RESOLUTION = 16
_MAX_RESOLUTION = 1024

ChannelTable = Tuple[Tuple[int, int], ...]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _normalize_channel_table(
    table: Union[None, Mapping[Any, Any], Iterable[Tuple[Any, Any]]],
) -> Optional[ChannelTable]:
    """Turn `{res: channels}` (keys may be strings, as after JSON) or pairs into sorted pairs."""
    if table is None:
        return None
    items = table.items() if isinstance(table, Mapping) else table
    pairs = []
    for res, ch in items:
        res_i, ch_i = int(res), int(ch)
        if not _is_power_of_two(res_i) or res_i < 4:
            raise ValueError(f"channels_by_res: resolution {res!r} is not a power of two >= 4")
        if ch_i <= 0:
            raise ValueError(f"channels_by_res: channel count for resolution {res_i} must be positive, got {ch!r}")
        pairs.append((res_i, ch_i))
    resolutions = [r for r, _ in pairs]
    if len(set(resolutions)) != len(resolutions):
        raise ValueError(f"channels_by_res: duplicate resolutions in {sorted(resolutions)}")
    return tuple(sorted(pairs))


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a StyleGAN2 generator (NVlabs stylegan2-ada-pytorch layout).

    Attributes:
        img_resolution: Output resolution; a power of two in [16, 1024].
        z_dim: Dimensionality of the input latent z (0 = no latent input).
        c_dim: Dimensionality of the conditioning label c (0 = unconditional).
        w_dim: Dimensionality of the intermediate latent w.
        img_channels: Number of output image channels.
        mapping_layers: Number of fully connected layers in the mapping network.
        mapping_lr_multiplier: Learning-rate multiplier of the mapping layers.
        channel_base: Channels at resolution r are `min(channel_base // r, channel_max)`.
        channel_max: Upper bound on the channels of any block.
        num_fp16_res: Number of highest resolutions that run in float16 (CUDA only).
        conv_clamp: Clamp convolution outputs to +-conv_clamp (times the activation
            gain); None disables clamping. Applies in float32 too, as in NVlabs.
        architecture: Only 'skip' (summed, upsampled toRGB outputs) is supported.
        w_avg_beta: Decay of the running average of w used for truncation.
        channels_by_res: Optional explicit channel counts, `{resolution: channels}`,
            overriding the `channel_base`/`channel_max` rule for the listed resolutions
            (checkpoints from rosinality/stylegan2-pytorch use tables that the rule
            cannot express). Stored as sorted `(resolution, channels)` pairs.
    """

    img_resolution: int
    z_dim: int = 512
    c_dim: int = 0
    w_dim: int = 512
    img_channels: int = 3
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 4
    conv_clamp: Optional[float] = 256
    architecture: str = "skip"
    w_avg_beta: float = 0.998
    channels_by_res: Optional[ChannelTable] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels_by_res", _normalize_channel_table(self.channels_by_res))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        res = self.img_resolution
        if not isinstance(res, numbers.Integral) or isinstance(res, bool) or not _is_power_of_two(int(res)) \
                or not _MIN_RESOLUTION <= res <= _MAX_RESOLUTION:
            raise ValueError(
                f"img_resolution must be a power of two in [{_MIN_RESOLUTION}, {_MAX_RESOLUTION}], got {res!r}")
        if self.architecture not in _SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; only {list(_SUPPORTED_ARCHITECTURES)} "
                "(NVlabs stylegan2 configuration: upsampled toRGB skip connections)")
        for name in ("z_dim", "c_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.z_dim == 0 and self.c_dim == 0:
            raise ValueError("z_dim and c_dim cannot both be 0")
        for name in ("w_dim", "img_channels", "mapping_layers", "channel_base", "channel_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_fp16_res < 0:
            raise ValueError(f"num_fp16_res must be >= 0, got {self.num_fp16_res}")
        if self.conv_clamp is not None and self.conv_clamp <= 0:
            raise ValueError(f"conv_clamp must be positive or None, got {self.conv_clamp}")
        if not 0.0 <= self.w_avg_beta <= 1.0:
            raise ValueError(f"w_avg_beta must be in [0, 1], got {self.w_avg_beta}")
        if self.mapping_lr_multiplier <= 0:
            raise ValueError(f"mapping_lr_multiplier must be positive, got {self.mapping_lr_multiplier}")
        for r in self.block_resolutions:
            if self.channels(r) <= 0:
                raise ValueError(f"resolution {r} gets {self.channels(r)} channels; raise channel_base")
        if self.channels_by_res is not None:
            extra = sorted(set(dict(self.channels_by_res)) - set(self.block_resolutions))
            if extra:
                raise ValueError(f"channels_by_res lists resolutions {extra} that the generator does not have "
                                 f"(blocks: {self.block_resolutions})")

    # ------------------------------------------------------------------ derived
    @property
    def resolution_log2(self) -> int:
        return int(math.log2(self.img_resolution))

    @property
    def block_resolutions(self) -> List[int]:
        """Resolutions of the synthesis blocks, 4, 8, ..., img_resolution."""
        return [2 ** i for i in range(2, self.resolution_log2 + 1)]

    @property
    def num_ws(self) -> int:
        """Number of w vectors the synthesis network consumes.

        One per convolution (1 at 4x4, 2 per higher block) plus one for the last toRGB
        (every other toRGB shares the w of the next block's first convolution).
        """
        return 2 * len(self.block_resolutions)

    @property
    def fp16_resolution(self) -> int:
        """Smallest resolution that runs in float16 (NVlabs rule; never below 8)."""
        return max(2 ** (self.resolution_log2 + 1 - self.num_fp16_res), 8)

    def channels(self, res: int) -> int:
        """Number of feature channels of the synthesis block at resolution `res`."""
        if self.channels_by_res is not None:
            table = dict(self.channels_by_res)
            if res in table:
                return table[res]
        return min(self.channel_base // res, self.channel_max)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly dictionary, with `"config_version"`; inverse of `from_dict`."""
        d: Dict[str, Any] = {"config_version": CONFIG_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "channels_by_res" and value is not None:
                value = {str(r): c for r, c in value}
            d[f.name] = value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GeneratorConfig":
        """Build from `to_dict()` output. Unknown keys raise ValueError naming them."""
        d = dict(d)
        version = d.pop("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"unsupported GeneratorConfig config_version {version!r} (this code reads {CONFIG_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GeneratorConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_nvlabs_init_kwargs(cls, kwargs: Mapping[str, Any]) -> "GeneratorConfig":
        """Translate the `_init_kwargs` of an NVlabs `Generator` into a config.

        Reads both the stylegan2-ada-pytorch layout (`mapping_kwargs={...}`,
        `synthesis_kwargs={...}`) and the stylegan3 repository's `networks_stylegan2`
        layout (synthesis keyword arguments at the top level). Keys that only affect
        memory layout or speed (`fp16_channels_last`, `fused_modconv_default`) are
        ignored; settings that change the network and that this implementation does
        not support raise ValueError.
        """
        kw = dict(kwargs)
        nested = "synthesis_kwargs" in kw  # stylegan2-ada-pytorch layout (vs. stylegan3's flat one)
        mapping_kw = dict(kw.pop("mapping_kwargs", None) or {})
        synthesis_kw = dict(kw.pop("synthesis_kwargs", None) or {})
        top = {k: int(kw.pop(k)) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels") if k in kw}
        synthesis_kw.update(kw)  # stylegan3-style flat kwargs: whatever is left is synthesis/block kwargs

        missing = [k for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels") if k not in top]
        if missing:
            raise ValueError(f"NVlabs init_kwargs lack {missing}")

        out: Dict[str, Any] = dict(top)
        out["mapping_layers"] = int(mapping_kw.pop("num_layers", 8))
        if "lr_multiplier" in mapping_kw:
            out["mapping_lr_multiplier"] = float(mapping_kw.pop("lr_multiplier"))
        # MappingNetwork's default decay: 0.995 in stylegan2-ada-pytorch, 0.998 in stylegan3.
        w_avg_beta = mapping_kw.pop("w_avg_beta", 0.995 if nested else 0.998)
        if w_avg_beta is None:
            raise ValueError("NVlabs mapping_kwargs: w_avg_beta=None (no w_avg buffer) is not supported")
        out["w_avg_beta"] = float(w_avg_beta)
        w_dim = int(top["w_dim"])
        _expect_default(mapping_kw, "mapping_kwargs", {
            "embed_features": (None, w_dim), "layer_features": (None, w_dim), "activation": ("lrelu",)})

        for key in ("channel_base", "channel_max", "num_fp16_res"):
            if key in synthesis_kw:
                out[key] = int(synthesis_kw.pop(key))
        if "conv_clamp" in synthesis_kw:
            clamp = synthesis_kw.pop("conv_clamp")
            out["conv_clamp"] = None if clamp is None else float(clamp)
        else:
            out["conv_clamp"] = None  # NVlabs default: no clamping
        if "num_fp16_res" not in out:
            out["num_fp16_res"] = 0  # NVlabs default
        out["architecture"] = synthesis_kw.pop("architecture", "skip")
        for key in ("fp16_channels_last", "fused_modconv_default", "channels_last"):
            synthesis_kw.pop(key, None)
        _expect_default(synthesis_kw, "synthesis_kwargs", {
            "resample_filter": ([1, 3, 3, 1], (1, 3, 3, 1)), "use_noise": (True,), "activation": ("lrelu",),
            "kernel_size": (3,)})
        return cls(**out)


def _expect_default(kw: Dict[str, Any], where: str, allowed: Mapping[str, tuple]) -> None:
    """Check that every key left in `kw` is known and has a supported value."""
    unknown = sorted(k for k in kw if k not in allowed)
    if unknown:
        raise ValueError(f"NVlabs {where}: unsupported keys {unknown}")
    for key, value in kw.items():
        ok = allowed[key]
        if isinstance(value, (list, tuple)):
            value_cmp = list(value)
            good = any(isinstance(a, (list, tuple)) and list(a) == value_cmp for a in ok)
        else:
            good = value in ok
        if not good:
            raise ValueError(f"NVlabs {where}: {key}={value!r} is not supported (supported: {list(ok)})")
