"""TF-era NVlabs StyleGAN2 pickles, converted to NVlabs PyTorch names without TensorFlow.

A pickle from NVlabs' TensorFlow stylegan2 (or stylegan2-ada TF) holds a tuple
``(G, D, Gs)`` of ``dnnlib.tflib.network.Network`` objects. The restricted unpickler
(`handsoff.gan.safe_pickle`) turns each into a `TFNetworkRecord` whose state holds
``static_kwargs`` (constructor arguments), ``components`` (``mapping``, ``synthesis``)
and ``variables``: ``(name, numpy array)`` pairs such as ``Dense0/weight`` (mapping),
``4x4/Const/const``, ``64x64/Conv0_up/weight``, ``noise3`` (synthesis), ``dlatent_avg``
(G itself).

Layout changes to the PyTorch convention (as NVlabs' own converter does them): dense
weights ``[in, out]`` are transposed; conv weights ``[kh, kw, in, out]`` become
``[out, in, kh, kw]``, and the weights of the upsampling convolutions are flipped in
space (TF's transposed convolution is the mirror image); the modulation bias gains the
+1 that TF adds at run time; ``const`` and noise inputs lose their batch axes. Only the
'skip' architecture with the standard [1, 3, 3, 1] filter is supported.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from handsoff.errors import CheckpointError
from handsoff.gan import safe_pickle
from handsoff.gan.checkpoints import NVLABS_RESAMPLE_FILTER, TensorSource, config_for_channels
from handsoff.gan.config import GeneratorConfig

__all__ = ["load_tf_generator_state", "tf_network_to_nvlabs", "tf_variables"]

PathLike = Union[str, "os.PathLike[str]"]

# static_kwargs that change the network and the only values this converter supports.
_FIXED_KWARGS: Dict[str, Tuple[Any, ...]] = {
    "architecture": ("skip",),
    "nonlinearity": ("lrelu",),
    "mapping_nonlinearity": ("lrelu",),
    "resample_kernel": ([1, 3, 3, 1],),
    "fmap_decay": (1, 1.0),
    "normalize_latents": (True,),
    "use_noise": (True,),
    "structure": ("auto", "fixed", None),
}
_IGNORED_VARIABLES = ("synthesis/lod",)


def tf_variables(record: safe_pickle.TFNetworkRecord, prefix: str = "") -> Dict[str, np.ndarray]:
    """All variables of a TF network and its components, named ``component/.../var``."""
    out: Dict[str, np.ndarray] = {}
    for pair in record.state.get("variables") or []:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError("TF network variables are not (name, array) pairs")
        out[prefix + pair[0]] = np.asarray(pair[1])
    for name, component in (record.state.get("components") or {}).items():
        if not isinstance(component, safe_pickle.TFNetworkRecord):
            raise ValueError(f"TF component {name!r} is not a network")
        out.update(tf_variables(component, f"{prefix}{name}/"))
    return out


def _check_static_kwargs(path: PathLike, kwargs: Mapping[str, Any]) -> None:
    for key, allowed in _FIXED_KWARGS.items():
        if key in kwargs and kwargs[key] not in allowed:
            raise CheckpointError(path, f"TF generator setting {key}={kwargs[key]!r} is not supported "
                                        f"(supported: {list(allowed)})")


def _tf_channels(params: Mapping[str, np.ndarray], resolutions: List[int]) -> Dict[int, int]:
    """Channels per block, from the bias of each block's last convolution."""
    channels = {}
    for res in resolutions:
        name = f"synthesis/{res}x{res}/{'Conv' if res == 4 else 'Conv1'}/bias"
        if name not in params:
            raise KeyError(name)
        channels[res] = int(params[name].shape[0])
    return channels


def _tf_config(path: PathLike, kwargs: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> GeneratorConfig:
    _check_static_kwargs(path, kwargs)
    resolution = int(kwargs.get("resolution", 1024))
    if any(name.startswith("synthesis/ToRGB_lod") for name in params):
        raise CheckpointError(path, "TF generator uses the 'orig' architecture (ToRGB_lod*); only 'skip' is supported")
    resolutions = [2 ** i for i in range(2, int(math.log2(max(resolution, 4))) + 1)]
    try:
        channels = _tf_channels(params, resolutions)
        beta = kwargs.get("dlatent_avg_beta", 0.995)
        return config_for_channels(
            channels, img_resolution=resolution, z_dim=int(kwargs.get("latent_size", 512)),
            c_dim=int(kwargs.get("label_size", 0)), w_dim=int(kwargs.get("dlatent_size", 512)),
            img_channels=int(kwargs.get("num_channels", 3)), mapping_layers=int(kwargs.get("mapping_layers", 8)),
            mapping_lr_multiplier=float(kwargs.get("mapping_lrmul", 0.01)),
            num_fp16_res=int(kwargs.get("num_fp16_res", 0) or 0),
            conv_clamp=None if kwargs.get("conv_clamp") is None else float(kwargs["conv_clamp"]),
            w_avg_beta=1.0 if beta is None else float(beta))
    except KeyError as exc:
        raise CheckpointError(path, f"TF generator lacks variable {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"unsupported TF generator settings ({exc})") from None


def _layer_scope(res: int, layer: str) -> Tuple[str, Optional[int], bool]:
    """TF scope of an NVlabs synthesis layer, its noise input index and whether it upsamples."""
    log2 = int(math.log2(res))
    if layer == "torgb":
        return f"synthesis/{res}x{res}/ToRGB", None, False
    if res == 4:
        return "synthesis/4x4/Conv", 0, False
    if layer == "conv0":
        return f"synthesis/{res}x{res}/Conv0_up", 2 * log2 - 5, True
    return f"synthesis/{res}x{res}/Conv1", 2 * log2 - 4, False


def _conv_weight(w: np.ndarray, flip: bool) -> np.ndarray:
    """``[kh, kw, in, out]`` -> ``[out, in, kh, kw]`` (mirrored for transposed convs)."""
    if flip:
        w = w[::-1, ::-1]
    return w.transpose(3, 2, 0, 1)


def _layer_tensor(src: TensorSource, res: int, layer: str, leaf: str) -> Optional[np.ndarray]:
    scope, noise_index, up = _layer_scope(res, layer)
    if leaf == "resample_filter":
        return NVLABS_RESAMPLE_FILTER.numpy()
    if leaf == "noise_const":
        noise = src.take(f"synthesis/noise{noise_index}")
        return None if noise is None else noise.reshape(noise.shape[-2:])
    tf_name = {"weight": "weight", "bias": "bias", "noise_strength": "noise_strength",
               "affine.weight": "mod_weight", "affine.bias": "mod_bias"}[leaf]
    value = src.take(f"{scope}/{tf_name}")
    if value is None:
        return None
    if leaf == "weight":
        return _conv_weight(value, flip=up)
    if leaf == "affine.weight":
        return value.T
    if leaf == "affine.bias":
        return value + 1  # TF adds 1 to the styles at run time; NVlabs initialises the bias to 1
    return value


def _nvlabs_tensor(src: TensorSource, key: str) -> Optional[np.ndarray]:
    """The value of NVlabs tensor ``key``, taken from the TF variables."""
    rules: List[Tuple[str, Callable[..., Optional[np.ndarray]]]] = [
        (r"mapping\.w_avg", lambda: src.take("dlatent_avg")),
        (r"mapping\.embed\.weight", lambda: _transposed(src.take("mapping/LabelEmbed/weight"))),
        (r"mapping\.embed\.bias", lambda: src.take("mapping/LabelEmbed/bias")),
        (r"mapping\.fc(\d+)\.weight", lambda i: _transposed(src.take(f"mapping/Dense{i}/weight"))),
        (r"mapping\.fc(\d+)\.bias", lambda i: src.take(f"mapping/Dense{i}/bias")),
        (r"synthesis\.b4\.const", lambda: _first(src.take("synthesis/4x4/Const/const"))),
        (r"synthesis\.b(\d+)\.resample_filter", lambda r: NVLABS_RESAMPLE_FILTER.numpy()),
        (r"synthesis\.b(\d+)\.(conv0|conv1|torgb)\.(.+)", lambda r, layer, leaf: _layer_tensor(src, int(r), layer, leaf)),
    ]
    for pattern, rule in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rule(*match.groups())
    raise KeyError(key)


def _transposed(value: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if value is None else value.T


def _first(value: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if value is None else value[0]


def tf_network_to_nvlabs(record: safe_pickle.TFNetworkRecord,
                         path: PathLike = "<pickle>") -> Tuple[GeneratorConfig, Dict[str, torch.Tensor]]:
    """Config and NVlabs-named tensors of a TF-era StyleGAN2 generator network."""
    from handsoff.gan.checkpoints import _name_few, _reference_shapes

    try:
        params = tf_variables(record)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None
    kwargs = safe_pickle.to_plain(record.state.get("static_kwargs") or {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(path, "TF network static_kwargs is not a dict")
    config = _tf_config(path, kwargs, params)
    src = TensorSource(params)
    state: Dict[str, torch.Tensor] = {}
    for key, _ in _reference_shapes(config)[0]:
        value = _nvlabs_tensor(src, key)
        if value is not None:
            state[key] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))
    if src.missing:
        raise CheckpointError(path, f"TF generator lacks variables {_name_few(src.missing)}")
    unused = [k for k in src.unused() if k not in _IGNORED_VARIABLES]
    if unused:
        raise CheckpointError(path, f"TF generator has variables this converter does not know: {_name_few(unused)}")
    return config, state


def load_tf_generator_state(path: PathLike, which: str = "G_ema") -> Tuple[GeneratorConfig, Dict[str, torch.Tensor]]:
    """Read ``G`` or ``Gs`` (= ``which='G_ema'``) from a TF-era ``(G, D, Gs)`` pickle."""
    data = safe_pickle.load_pickle(path)
    if not (isinstance(data, (tuple, list)) and len(data) == 3
            and all(isinstance(net, safe_pickle.TFNetworkRecord) for net in data)):
        raise CheckpointError(path, "not a TF-era NVlabs network pickle (expected a tuple (G, D, Gs) of networks)")
    return tf_network_to_nvlabs(data[2] if which == "G_ema" else data[0], path)
