"""Loading and saving generator checkpoints in every common format, without running their code.

Formats (`detect_format` tells them apart by content, not by file name):

``'nvlabs-pkl'``
    NVlabs stylegan2-ada-pytorch / stylegan3 (config "stylegan2") network pickles, a
    dict ``{G, D, G_ema, augment_pipe, training_set_kwargs}``. Read with the restricted
    unpickler of `handsoff.gan.safe_pickle`: the module source stored in the file is
    never executed, and any global outside a small allow-list is refused.
``'nvlabs-tf-pkl'``
    TF-era NVlabs stylegan2 pickles ``(G, D, Gs)``, converted without TensorFlow
    (`handsoff.gan.tf_pickle`).
``'rosinality-pt'``
    rosinality/stylegan2-pytorch checkpoints ``{'g_ema': state_dict, 'g': ...,
    'latent_avg': ...}`` (``torch.load(weights_only=True)``); channel counts, resolution
    and mapping depth are read from the tensor shapes and the keys renamed to NVlabs'.
``'nvlabs-state-safetensors'``
    An NVlabs ``Generator.state_dict()`` in safetensors with the constructor arguments
    as JSON in the metadata key ``init_kwargs``.
``'handsoff-safetensors'``
    This project's format (`save_generator`): NVlabs-named tensors, metadata
    ``{"format": "handsoff.generator", "format_version": "1", "config": <JSON of
    GeneratorConfig.to_dict()>, ...}``.

Every problem with a file raises `handsoff.errors.CheckpointError`, one line naming the
file and what is wrong.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from handsoff.errors import CheckpointError
from handsoff.gan import safe_pickle
from handsoff.gan.config import GeneratorConfig
from handsoff.utils.io import sha256_file

__all__ = [
    "FORMATS", "HANDSOFF_FORMAT", "HANDSOFF_FORMAT_VERSION",
    "detect_format", "load_generator_state", "load_generator", "save_generator", "checkpoint_info",
    "rosinality_to_nvlabs", "nvlabs_pickle_to_state", "config_for_channels", "TensorSource",
    "NVLABS_RESAMPLE_FILTER",
]

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, torch.Tensor]

FORMATS = ("nvlabs-pkl", "nvlabs-tf-pkl", "rosinality-pt", "handsoff-safetensors", "nvlabs-state-safetensors")
HANDSOFF_FORMAT = "handsoff.generator"
HANDSOFF_FORMAT_VERSION = "1"
_RESERVED_METADATA = ("format", "format_version", "config")
_WHICH = ("G_ema", "G")
_MAX_NAMED = 5  # how many offending keys an error message lists

_ZIP_MAGIC = b"PK\x03\x04"
# A legacy (pre-zip) torch.save file starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
_SAFETENSORS_MAX_HEADER = 100 * 2 ** 20
# NVlabs' resample filter: outer product of [1, 3, 3, 1], normalised to sum 1.
_FIR_TAPS = torch.tensor([1.0, 3.0, 3.0, 1.0])
NVLABS_RESAMPLE_FILTER = torch.outer(_FIR_TAPS, _FIR_TAPS) / torch.outer(_FIR_TAPS, _FIR_TAPS).sum()


# =========================================================================== helpers
def _name_few(keys: Iterable[str]) -> str:
    """``'a', 'b', 'c' (+4 more)``: the first few of ``keys`` for an error message."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_NAMED])
    return shown + (f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_which(which: str) -> None:
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")


def _check_readable_file(path: PathLike) -> Path:
    """The path as a Path, or CheckpointError for a missing path, a folder or an empty file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(path, "no such file")
    if p.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise CheckpointError(path, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise CheckpointError(path, "empty file")
    return p


def _read_head(path: PathLike, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read file ({exc.strerror or exc})") from None


# =========================================================================== format detection
def detect_format(path: PathLike) -> str:
    """Which of `FORMATS` the file at ``path`` is, judged by its content.

    Zip and legacy ``torch.save`` files are ``'rosinality-pt'``; binary pickles are
    ``'nvlabs-pkl'`` (or ``'nvlabs-tf-pkl'`` when their first network is a TF-era
    ``dnnlib.tflib.network.Network``); safetensors files are told apart by metadata.
    """
    p = _check_readable_file(path)
    head = _read_head(p)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        return "rosinality-pt"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return _pickle_kind(p)
    if _looks_like_safetensors(head):
        return _safetensors_kind(path, _read_safetensors_metadata(path))
    raise CheckpointError(path, "unrecognised file format (not a network pickle, torch.save file or safetensors file)")


def _pickle_kind(path: Path, max_ops: int = 20000) -> str:
    """'nvlabs-tf-pkl' when the pickle names a ``dnnlib.tflib`` global before any
    ``torch_utils`` one, else 'nvlabs-pkl' (errors are left for the loader to report)."""
    try:
        with open(path, "rb") as f:
            for count, (_, arg, _) in enumerate(pickletools.genops(f)):
                if isinstance(arg, str) and arg.startswith("dnnlib.tflib"):
                    return "nvlabs-tf-pkl"
                if isinstance(arg, str) and arg.startswith("torch_utils"):
                    return "nvlabs-pkl"
                if count >= max_ops:
                    break
    except (ValueError, EOFError, OSError):
        pass  # truncated or odd opcodes: the restricted unpickler names the problem
    return "nvlabs-pkl"


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file, checking that the file is complete."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _SAFETENSORS_MAX_HEADER:
            raise CheckpointError(path, f"corrupt safetensors header (claims {header_len} bytes)")
        if 8 + header_len > size:
            raise CheckpointError(path, "truncated file (safetensors header ended early)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    ends = [_data_end(path, key, entry) for key, entry in header.items() if key != "__metadata__"]
    if 8 + header_len + max(ends, default=0) > size:
        raise CheckpointError(path, "truncated file (safetensors tensor data ended early)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "corrupt safetensors header (__metadata__ is not an object)")
    return metadata


def _data_end(path: PathLike, key: str, entry: Any) -> int:
    """Where the data of header entry ``key`` ends (relative to the data section)."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(path, f"corrupt safetensors header (bad entry for {key!r})")
    return offsets[1]


def _safetensors_kind(path: PathLike, metadata: Mapping[str, str]) -> str:
    if metadata.get("format") == HANDSOFF_FORMAT:
        return "handsoff-safetensors"
    if "init_kwargs" in metadata:
        return "nvlabs-state-safetensors"
    if "format" in metadata:
        raise CheckpointError(path, f"unknown safetensors format {metadata['format']!r} "
                                    f"(expected {HANDSOFF_FORMAT!r})")
    raise CheckpointError(path, "safetensors file without generator metadata (neither a handsoff 'config' "
                                "nor NVlabs 'init_kwargs'); cannot tell the architecture")


# =========================================================================== loading: per format
def _config_from_nvlabs_kwargs(path: PathLike, init_kwargs: Any) -> GeneratorConfig:
    if not isinstance(init_kwargs, dict):
        raise CheckpointError(path, "generator has no constructor arguments (_init_kwargs / init_kwargs)")
    try:
        return GeneratorConfig.from_nvlabs_init_kwargs(safe_pickle.to_plain(init_kwargs))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"unsupported generator settings: {_first_line(exc)}") from None


def _load_nvlabs_pickle(path: PathLike, which: str) -> Tuple[GeneratorConfig, StateDict]:
    return nvlabs_pickle_to_state(safe_pickle.load_pickle(path), which, path)


def nvlabs_pickle_to_state(data: Any, which: str, path: PathLike = "<pickle>") -> Tuple[GeneratorConfig, StateDict]:
    """Config and NVlabs state dict of network ``which`` of an unpickled NVlabs snapshot."""
    if not isinstance(data, dict):
        raise CheckpointError(path, f"pickle holds a {type(data).__name__}, not an NVlabs network snapshot "
                                    "(a dict with G, D, G_ema)")
    if which not in data:
        raise CheckpointError(path, f"no {which!r} network in the pickle (it has keys {_name_few(map(str, data))})")
    record = data[which]
    if not isinstance(record, safe_pickle.PersistentRecord):
        raise CheckpointError(path, f"{which!r} is not an NVlabs network (found a {type(record).__name__})")
    if record.class_name != "Generator":
        raise CheckpointError(path, f"{which!r} is a {record.class_name!r}, not a Generator")
    _refuse_stylegan3(path, which, record)
    config = _config_from_nvlabs_kwargs(path, record.state.get("_init_kwargs"))
    try:
        state = safe_pickle.module_tensors(record)
    except ValueError as exc:
        raise CheckpointError(path, f"{which!r}: {exc}") from None
    return config, state


def _refuse_stylegan3(path: PathLike, which: str, record: safe_pickle.PersistentRecord) -> None:
    """StyleGAN3 ('stylegan3-t'/'stylegan3-r') generators synthesise differently: refuse them."""
    class_names = {rec.class_name for _, rec in safe_pickle.walk_records(record)}
    if "SynthesisInput" not in class_names:
        return
    kwargs = safe_pickle.to_plain(record.state.get("_init_kwargs") or {})
    cfg = "stylegan3-r" if isinstance(kwargs, dict) and kwargs.get("conv_kernel") == 1 else "stylegan3-t"
    raise CheckpointError(path, f"{which!r} is a StyleGAN3 generator (config {cfg!r}, alias-free synthesis), "
                                "which handsoff does not implement; use a 'stylegan2'-config network")


def _load_torch_file(path: PathLike) -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into one-line CheckpointErrors.

    ``argparse.Namespace`` is allowed besides torch's own weights-only globals: rosinality's
    training checkpoints keep their command-line ``args`` in one (it only holds values).
    """
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        refused = re.search(r"(?:GLOBAL|global) '?([\w.]+)", str(exc))
        if refused:
            raise CheckpointError(path, f"refuses to load global '{refused.group(1)}' (not a network weight; "
                                        "handsoff never executes code from checkpoint files)") from None
        raise CheckpointError(path, f"corrupt torch.save file ({_first_line(exc)})") from None
    except EOFError:
        raise CheckpointError(path, "truncated file (torch.save data ended early)") from None
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as exc:
        message = _first_line(exc)
        if "central directory" in message or "ended early" in message:
            reason = message.split(". ")[0].split(": ")[-1]
            raise CheckpointError(path, f"truncated or corrupt torch.save zip archive ({reason})") from None
        raise CheckpointError(path, f"corrupt torch.save file ({message})") from None


def _load_rosinality(path: PathLike, which: str) -> Tuple[GeneratorConfig, StateDict]:
    data = _load_torch_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(path, f"holds a {type(data).__name__}, not a rosinality checkpoint (a dict with 'g_ema')")
    key = "g_ema" if which == "G_ema" else "g"
    if key not in data:
        raise CheckpointError(path, f"no {key!r} generator in the checkpoint (it has keys {_name_few(map(str, data))})")
    source = data[key]
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise CheckpointError(path, f"{key!r} is not a state dict of tensors")
    latent_avg = data.get("latent_avg")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(path, "'latent_avg' is not a tensor")
    return rosinality_to_nvlabs(source, latent_avg, path, key)


def _read_safetensors(path: PathLike) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"corrupt safetensors file ({_first_line(exc)})") from None


def _single_network(path: PathLike, which: str) -> None:
    if which != "G_ema":
        raise CheckpointError(path, f"holds a single generator; which={which!r} applies only to files that keep "
                                    "both G and G_ema (NVlabs .pkl, rosinality .pt)")


def _parse_json_metadata(path: PathLike, metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"metadata {key!r} is missing or not valid JSON ({_first_line(exc)})") from None


def _load_handsoff_safetensors(path: PathLike, which: str) -> Tuple[GeneratorConfig, StateDict]:
    _single_network(path, which)
    metadata = _read_safetensors_metadata(path)
    version = metadata.get("format_version")
    if version != HANDSOFF_FORMAT_VERSION:
        raise CheckpointError(path, f"unsupported {HANDSOFF_FORMAT} format_version {version!r} "
                                    f"(this handsoff reads {HANDSOFF_FORMAT_VERSION!r})")
    config_dict = _parse_json_metadata(path, metadata, "config")
    if not isinstance(config_dict, dict):
        raise CheckpointError(path, "metadata 'config' is not a JSON object")
    try:
        config = GeneratorConfig.from_dict(config_dict)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"bad generator config: {_first_line(exc)}") from None
    return config, _read_safetensors(path)


def _load_nvlabs_safetensors(path: PathLike, which: str) -> Tuple[GeneratorConfig, StateDict]:
    _single_network(path, which)
    metadata = _read_safetensors_metadata(path)
    config = _config_from_nvlabs_kwargs(path, _parse_json_metadata(path, metadata, "init_kwargs"))
    return config, _read_safetensors(path)


def _load_tf_pickle(path: PathLike, which: str) -> Tuple[GeneratorConfig, StateDict]:
    from handsoff.gan import tf_pickle

    return tf_pickle.load_tf_generator_state(path, which)


_LOADERS: Dict[str, Callable[[PathLike, str], Tuple[GeneratorConfig, StateDict]]] = {
    "nvlabs-pkl": _load_nvlabs_pickle,
    "nvlabs-tf-pkl": _load_tf_pickle,
    "rosinality-pt": _load_rosinality,
    "handsoff-safetensors": _load_handsoff_safetensors,
    "nvlabs-state-safetensors": _load_nvlabs_safetensors,
}


# =========================================================================== rosinality -> NVlabs
class TensorSource:
    """A foreign state dict whose entries are taken one by one; it remembers what was
    missing and what was never taken, so that errors can list them all."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors = dict(tensors)
        self.taken: set = set()
        self.missing: List[str] = []

    def take(self, key: str) -> Any:
        """The entry ``key``, or None (and ``key`` noted as missing)."""
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.taken.add(key)
        return self.tensors[key]

    def unused(self) -> List[str]:
        return [k for k in self.tensors if k not in self.taken]

    def count(self, pattern: str) -> int:
        """How many distinct indices the regex ``pattern`` (one integer group) matches."""
        return len({int(m.group(1)) for k in self.tensors for m in [re.fullmatch(pattern, k)] if m})


def _drop_leading_one(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[1, ...] -> [...]`` (rosinality keeps a batch axis on weights, const and noise)."""
    if t is None or t.dim() == 0 or t.shape[0] != 1:
        return t
    return t.reshape(t.shape[1:])


def _rosinality_layer(src: TensorSource, dst: Dict[str, Optional[torch.Tensor]], to: str, frm: str,
                      noise_index: int, up: bool) -> None:
    """One StyledConv -> SynthesisLayer (weights, affine, bias, noise, resample filter)."""
    dst[f"{to}.weight"] = _drop_leading_one(src.take(f"{frm}.conv.weight"))
    dst[f"{to}.affine.weight"] = src.take(f"{frm}.conv.modulation.weight")
    dst[f"{to}.affine.bias"] = src.take(f"{frm}.conv.modulation.bias")
    dst[f"{to}.bias"] = src.take(f"{frm}.activate.bias")
    strength = src.take(f"{frm}.noise.weight")
    dst[f"{to}.noise_strength"] = None if strength is None else strength.reshape(())
    noise = src.take(f"noises.noise_{noise_index}")
    dst[f"{to}.noise_const"] = None if noise is None else noise.reshape(noise.shape[-2:])
    # rosinality's Blur kernel after a transposed conv is the normalised FIR times up**2 = 4;
    # NVlabs stores the normalised filter and applies the gain up**2 at run time.
    blur = src.take(f"{frm}.conv.blur.kernel") if up else None
    dst[f"{to}.resample_filter"] = NVLABS_RESAMPLE_FILTER.clone() if blur is None else blur / 4


def _rosinality_torgb(src: TensorSource, dst: Dict[str, Optional[torch.Tensor]], to: str, frm: str) -> None:
    dst[f"{to}.weight"] = _drop_leading_one(src.take(f"{frm}.conv.weight"))
    dst[f"{to}.affine.weight"] = src.take(f"{frm}.conv.modulation.weight")
    dst[f"{to}.affine.bias"] = src.take(f"{frm}.conv.modulation.bias")
    bias = src.take(f"{frm}.bias")
    dst[f"{to}.bias"] = None if bias is None else bias.reshape(-1)


def _rosinality_channels(src: TensorSource, num_blocks: int) -> Tuple[Dict[int, int], List[str]]:
    """Channels per resolution read from tensor shapes (not from rosinality's table),
    and the keys that were needed for it but are missing or malformed."""
    needed = {4: ("input.input", 4)}
    needed.update({8 * 2 ** k: (f"convs.{2 * k}.conv.weight", 5) for k in range(num_blocks)})
    channels, bad = {}, []
    for res, (key, ndim) in needed.items():
        tensor = src.tensors.get(key)
        if tensor is None or tensor.dim() != ndim:
            bad.append(key)
        else:
            channels[res] = int(tensor.shape[1])
    return channels, bad


def config_for_channels(channels: Dict[int, int], **kwargs: Any) -> GeneratorConfig:
    """A config with these channels: the NVlabs rule when it fits, else an explicit table."""
    top = max(channels)
    base, cmax = channels[top] * top, channels[4]
    if all(min(base // r, cmax) == c for r, c in channels.items()):
        return GeneratorConfig(channel_base=base, channel_max=cmax, **kwargs)
    return GeneratorConfig(channel_base=base, channel_max=max(channels.values()),
                           channels_by_res=channels, **kwargs)


def rosinality_to_nvlabs(tensors: Mapping[str, torch.Tensor], latent_avg: Optional[torch.Tensor],
                         path: PathLike = "<state dict>", key: str = "g_ema") -> Tuple[GeneratorConfig, StateDict]:
    """Convert a rosinality ``Generator.state_dict()`` to a config and NVlabs-named tensors.

    The stored values carry over unchanged: both implementations keep equalised-lr
    weights as N(0,1)/lr_mul and scale them at run time with the same constants
    (`lr_mul / sqrt(fan_in)`, bias times lr_mul), apply noise as ``x + strength * noise``
    before bias and lrelu, upsample with a transposed conv + [1,3,3,1] FIR (gain 4) and
    truncate with ``lerp(w_avg, w, psi)``. Only layouts change (leading batch axes, bias
    shapes), and the FIR kernels are divided by the gain 4 that NVlabs applies at run
    time. Not stored by rosinality and taken as its defaults: mapping lr multiplier 0.01,
    no conv clamping, no float16 layers.
    """
    src = TensorSource(tensors)
    num_blocks = src.count(r"to_rgbs\.(\d+)\..*")
    num_mapping = src.count(r"style\.(\d+)\.weight")
    if num_mapping == 0 or "input.input" not in src.tensors:
        raise CheckpointError(path, f"{key!r} is not a rosinality generator (no 'style.N.weight' / 'input.input'; "
                                    f"keys start {_name_few(src.tensors)})")
    first_fc, last_fc = src.tensors.get("style.1.weight"), src.tensors.get(f"style.{num_mapping}.weight")
    if first_fc is None or last_fc is None or first_fc.dim() != 2 or last_fc.dim() != 2:
        raise CheckpointError(path, f"{key!r}: mapping layers are not numbered style.1 ... style.{num_mapping}")
    rgb = src.tensors.get("to_rgb1.conv.weight")
    channels, bad = _rosinality_channels(src, num_blocks)
    if bad:
        raise CheckpointError(path, f"{key!r} lacks keys (or has malformed) {_name_few(bad)}")
    try:
        config = config_for_channels(
            channels, img_resolution=4 * 2 ** num_blocks, z_dim=int(first_fc.shape[1]), w_dim=int(last_fc.shape[0]),
            img_channels=int(rgb.shape[1]) if rgb is not None and rgb.dim() == 5 else 3,
            mapping_layers=num_mapping, mapping_lr_multiplier=0.01, num_fp16_res=0, conv_clamp=None)
    except ValueError as exc:
        raise CheckpointError(path, f"{key!r}: unsupported architecture ({_first_line(exc)})") from None

    dst: Dict[str, Optional[torch.Tensor]] = {}
    for i in range(num_mapping):
        dst[f"mapping.fc{i}.weight"] = src.take(f"style.{i + 1}.weight")
        dst[f"mapping.fc{i}.bias"] = src.take(f"style.{i + 1}.bias")
    if latent_avg is not None:
        dst["mapping.w_avg"] = latent_avg.reshape(-1)
    dst["synthesis.b4.const"] = _drop_leading_one(src.take("input.input"))
    dst["synthesis.b4.resample_filter"] = NVLABS_RESAMPLE_FILTER.clone()
    _rosinality_layer(src, dst, "synthesis.b4.conv1", "conv1", 0, up=False)
    _rosinality_torgb(src, dst, "synthesis.b4.torgb", "to_rgb1")
    for k in range(num_blocks):
        block = f"synthesis.b{8 * 2 ** k}"
        _rosinality_layer(src, dst, f"{block}.conv0", f"convs.{2 * k}", 2 * k + 1, up=True)
        _rosinality_layer(src, dst, f"{block}.conv1", f"convs.{2 * k + 1}", 2 * k + 2, up=False)
        _rosinality_torgb(src, dst, f"{block}.torgb", f"to_rgbs.{k}")
        upsample = src.take(f"to_rgbs.{k}.upsample.kernel")
        dst[f"{block}.resample_filter"] = NVLABS_RESAMPLE_FILTER.clone() if upsample is None else upsample / 4

    # Blur / upsample kernels are fixed buffers that NVlabs regenerates: do not demand them.
    src.missing = [k for k in src.missing if not k.endswith(".kernel")]
    if src.missing:
        raise CheckpointError(path, f"{key!r} lacks keys {_name_few(src.missing)}")
    if src.unused():
        raise CheckpointError(path, f"{key!r} has unexpected keys {_name_few(src.unused())}")
    state = {k: v for k, v in dst.items() if v is not None}
    if "mapping.w_avg" not in state:
        state["mapping.w_avg"] = _estimate_w_avg(config, state)
    return config, state


def _estimate_w_avg(config: GeneratorConfig, state: StateDict, samples: int = 4096, seed: int = 0) -> torch.Tensor:
    """Mean w over ``samples`` seeded z, for checkpoints that store no ``latent_avg``
    (what rosinality's ``mean_latent`` computes before truncating)."""
    from handsoff.gan.networks import Generator

    warnings.warn("checkpoint has no latent_avg: estimating w_avg from 4096 seeded samples", stacklevel=3)
    G = Generator(config)
    mapping_state = {k[len("mapping."):]: v for k, v in state.items() if k.startswith("mapping.")}
    mapping_state["w_avg"] = torch.zeros(config.w_dim)
    G.mapping.load_state_dict(mapping_state, strict=True)
    z = torch.randn(samples, config.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.mapping(z, None)[:, 0].mean(dim=0)


# =========================================================================== validation
@functools.lru_cache(maxsize=8)
def _reference_shapes(config: GeneratorConfig) -> Tuple[Tuple[Tuple[str, Tuple[int, ...]], ...], int]:
    """``((name, shape), ...)`` of ``Generator(config).state_dict()`` and its parameter count.

    Built on the meta device (no memory), falling back to the CPU.
    """
    from handsoff.gan.networks import Generator

    try:
        with torch.device("meta"):
            G = Generator(config)
    except (RuntimeError, NotImplementedError, TypeError):
        G = Generator(config)
    shapes = tuple((k, tuple(v.shape)) for k, v in G.state_dict().items())
    return shapes, sum(p.numel() for p in G.parameters())


def _check_state(path: PathLike, config: GeneratorConfig, state: Mapping[str, Any]) -> None:
    """CheckpointError naming the first few missing, unexpected or mis-shaped tensors."""
    expected = dict(_reference_shapes(config)[0])
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensors {_name_few(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_name_few(extra)}")
    if problems:
        raise CheckpointError(path, "state dict does not match the generator config: " + "; ".join(problems))
    not_tensors = [k for k in expected if not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        raise CheckpointError(path, f"entries are not tensors: {_name_few(not_tensors)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {shape})" for k, shape in expected.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise CheckpointError(path, "wrong tensor shapes: " + "; ".join(wrong[:_MAX_NAMED])
                              + (f" (+{len(wrong) - _MAX_NAMED} more)" if len(wrong) > _MAX_NAMED else ""))
    not_float = [k for k in expected if not state[k].is_floating_point()]
    if not_float:
        raise CheckpointError(path, f"non-floating-point tensors: {_name_few(not_float)}")


# =========================================================================== public API
def load_generator_state(path: PathLike, which: str = "G_ema") -> Tuple[GeneratorConfig, StateDict, str]:
    """Read a generator checkpoint of any supported format, executing nothing from it.

    Args:
        path: The checkpoint file.
        which: ``'G_ema'`` (the default: the averaged generator used for sampling) or
            ``'G'`` (the training generator), for formats that keep both.

    Returns:
        ``(config, state_dict, format)``: the architecture, the tensors under NVlabs
        stylegan2-ada-pytorch names (loadable with ``Generator(config).load_state_dict``)
        and the detected format (one of `FORMATS`).

    Raises:
        CheckpointError: The file is missing, unreadable, of an unknown kind, malicious,
            or its tensors do not fit the architecture it declares.
    """
    _check_which(which)
    fmt = detect_format(path)
    config, state = _LOADERS[fmt](path, which)
    _check_state(path, config, state)
    return config, state, fmt


def load_generator(path: PathLike, device: Union[str, torch.device] = "cpu", which: str = "G_ema"):
    """Load a generator checkpoint into a `handsoff.gan.networks.Generator`.

    The network is in eval mode, its parameters do not require gradients, and it lives
    on ``device``. See `load_generator_state` for ``which`` and the errors raised.
    """
    from handsoff.gan.networks import Generator

    config, state, _ = load_generator_state(path, which)
    G = Generator(config)
    G.load_state_dict(state, strict=True)
    return G.eval().requires_grad_(False).to(device)


def _metadata_value(key: Any, value: Any) -> str:
    if not isinstance(key, str):
        raise ValueError(f"extra_metadata keys must be strings, got {key!r}")
    if key in _RESERVED_METADATA:
        raise ValueError(f"extra_metadata may not set the reserved key {key!r}")
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save_generator(G: torch.nn.Module, path: PathLike, extra_metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``G`` (a `Generator` with a ``config``) as a handsoff safetensors file.

    The file holds every ``state_dict()`` tensor under its NVlabs name plus metadata
    ``format``, ``format_version``, ``config`` (JSON of ``G.config.to_dict()``),
    ``handsoff_version`` and ``extra_metadata`` (values that are not strings are stored
    as JSON). It is written to a temporary file beside ``path`` and renamed into place,
    so ``path`` never holds a partial file.
    """
    from handsoff import __version__
    from handsoff.utils.io import save_safetensors

    config = getattr(G, "config", None)
    if not isinstance(config, GeneratorConfig):
        raise TypeError("save_generator needs a handsoff Generator (with a GeneratorConfig in .config)")
    metadata = {"handsoff_version": __version__}
    metadata.update({k: _metadata_value(k, v) for k, v in (extra_metadata or {}).items()})
    metadata.update({"format": HANDSOFF_FORMAT, "format_version": HANDSOFF_FORMAT_VERSION,
                     "config": json.dumps(config.to_dict(), sort_keys=True)})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in G.state_dict().items()}
    save_safetensors(path, tensors, metadata)


def checkpoint_info(path: PathLike) -> Dict[str, Any]:
    """Summary of a generator checkpoint (loads and validates it; executes nothing).

    Keys: ``path``, ``format``, ``resolution``, ``num_ws``, ``z_dim``, ``w_dim``,
    ``c_dim``, ``img_channels``, ``mapping_layers``, ``channels`` (``{resolution:
    channels}``), ``num_params`` (parameters, buffers excluded), ``num_tensors``,
    ``file_size``, ``sha256`` (of the file) and ``config`` (``GeneratorConfig.to_dict()``).
    """
    config, state, fmt = load_generator_state(path)
    return {
        "path": os.fspath(path),
        "format": fmt,
        "resolution": config.img_resolution,
        "num_ws": config.num_ws,
        "z_dim": config.z_dim,
        "w_dim": config.w_dim,
        "c_dim": config.c_dim,
        "img_channels": config.img_channels,
        "mapping_layers": config.mapping_layers,
        "channels": {res: config.channels(res) for res in config.block_resolutions},
        "num_params": _reference_shapes(config)[1],
        "num_tensors": len(state),
        "file_size": Path(path).stat().st_size,
        "sha256": sha256_file(path),
        "config": config.to_dict(),
    }
