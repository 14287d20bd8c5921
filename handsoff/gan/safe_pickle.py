"""A restricted unpickler for network pickles: it reads weights and imports no code.

NVlabs network pickles (stylegan2-ada-pytorch, stylegan3, and the TensorFlow-era
stylegan2) are ordinary pickles whose globals rebuild the networks by *executing* the
Python source stored in the file. This module reads the same byte stream with an
unpickler whose `find_class` resolves only an explicit allow-list of harmless globals,
each mapped to code of ours:

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> `PersistentRecord`
  (class name + module state dict; the stored ``module_src`` is never executed),
* ``dnnlib.tflib.network.Network`` -> `TFNetworkRecord` (TF-era networks),
* ``dnnlib.util.EasyDict`` -> `EasyDict` (a plain dict subclass),
* torch tensor/parameter rebuild functions, with storages read by
  ``torch.load(..., weights_only=True)`` from the nested legacy ``torch.save`` bytes,
* numpy array/scalar/dtype reconstruction, ``collections.OrderedDict``, sets.

Any other global (``posix.system``, ``builtins.eval``, a torch module class, ...) stops
the load with a `CheckpointError` before anything from the file runs.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from handsoff.errors import CheckpointError

__all__ = [
    "PersistentRecord", "TFNetworkRecord", "EasyDict", "RestrictedUnpickler", "RefusedGlobalError",
    "load_pickle", "loads", "to_plain", "module_tensors", "walk_records",
]

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- records
@dataclass
class PersistentRecord:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` would rebuild.

    Attributes:
        class_name: Name of the persisted class, e.g. ``'Generator'``.
        state: The object's ``__dict__`` (for a torch module: ``_parameters``,
            ``_buffers``, ``_modules``, ``_init_kwargs``, plain attributes).
        version: The persistence format version stored in the file.
        module_src: The stored module source, kept as text only (never executed).
    """

    class_name: str
    state: Dict[str, Any]
    version: Optional[int] = None
    module_src: str = field(default="", repr=False)


class TFNetworkRecord:
    """Stands in for ``dnnlib.tflib.network.Network``: keeps the pickled state dict.

    The state of a TF-era network holds ``name``, ``static_kwargs``, ``components``
    (sub-networks) and ``variables`` (a list of ``(name, numpy array)`` pairs).
    """

    def __init__(self) -> None:
        self.state: Dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"TF network state is a {type(state).__name__}, not a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"TFNetworkRecord(name={self.state.get('name')!r})"


class EasyDict(dict):
    """Stands in for ``dnnlib.util.EasyDict``: a dict (attribute access is not needed)."""


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


# --------------------------------------------------------------------------- rebuilders
def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    """Record an NVlabs persistent object instead of executing its ``module_src``."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("persistent object metadata is not of type 'class'")
    class_name = meta.get("class_name")
    state = meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise pickle.UnpicklingError("persistent object metadata lacks class_name or state")
    src = meta.get("module_src")
    return PersistentRecord(class_name=class_name, state=state, version=meta.get("version"),
                            module_src=src if isinstance(src, str) else "")


def _load_storage_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """Read one storage from the nested legacy ``torch.save`` bytes, weights only."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notices
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"storage payload holds a {type(storage).__name__}")
    return storage


def _int_tuple(values: Any, what: str) -> Tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(isinstance(v, int) for v in values):
        raise pickle.UnpicklingError(f"tensor {what} is not a tuple of ints")
    return tuple(int(v) for v in values)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """A tensor viewing ``storage``; requires_grad, hooks and metadata are dropped."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("tensor data is not a torch storage")
    if not isinstance(storage_offset, int):
        raise pickle.UnpicklingError("tensor storage offset is not an int")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = torch.empty((0,), dtype=storage.dtype)
        return base.set_(storage._untyped_storage, storage_offset,
                         _int_tuple(size, "size"), _int_tuple(stride, "stride"))


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """A parameter's data as a plain tensor (gradients are not needed to load weights)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return data.detach()


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy array of a subclass")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar`` for non-object dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of an unsupported kind")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use to carry bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("_codecs.encode used for anything but latin-1 bytes")
    return text.encode("latin-1")


_TORCH_DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16", "half", "float", "double",
                      "int8", "int16", "int32", "int64", "uint8", "bool", "long", "int")


def _allow_list() -> Dict[Tuple[str, str], Any]:
    allowed: Dict[Tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("dnnlib.tflib.network", "Network"): TFNetworkRecord,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("dnnlib", "EasyDict"): EasyDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _numpy_reconstruct
        allowed[(module, "scalar")] = _numpy_scalar
    for name in _TORCH_DTYPE_NAMES:
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = _allow_list()
"""(module, name) -> the object of ours that the pickle gets instead."""


# --------------------------------------------------------------------------- unpickler
_PY2_NAMES: Dict[Tuple[str, str], Tuple[str, str]] = dict(_compat_pickle.NAME_MAPPING)
_PY2_MODULES: Dict[str, str] = dict(_compat_pickle.IMPORT_MAPPING)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS` and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name some globals the Python 2 way ('__builtin__.set').
        module, name = _PY2_NAMES.get((module, name), (_PY2_MODULES.get(module, module), name))
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobalError(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("the pickle refers to external (persistent) objects")


_CORRUPTION_ERRORS = (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
                      AttributeError, RuntimeError, OverflowError, UnicodeDecodeError, RecursionError)


def _load_stream(stream: BinaryIO, name: PathLike) -> Any:
    """Unpickle ``stream`` with `RestrictedUnpickler`, turning failures into CheckpointError."""
    try:
        return RestrictedUnpickler(stream).load()
    except RefusedGlobalError as exc:
        raise CheckpointError(name, f"refuses to load global '{exc.module}.{exc.name}' (not a network weight; "
                                    "handsoff never executes code from checkpoint files)") from None
    except EOFError:
        raise CheckpointError(name, "truncated file (pickle data ended early)") from None
    except _CORRUPTION_ERRORS as exc:
        if "truncated" in str(exc):
            raise CheckpointError(name, "truncated file (pickle data ended early)") from None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(name, f"corrupt pickle data ({type(exc).__name__}: {detail})") from None


def load_pickle(path: PathLike) -> Any:
    """Unpickle the file at ``path`` through the allow-list; errors name the file."""
    try:
        with open(path, "rb") as f:
            return _load_stream(f, path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read file ({exc.strerror or exc})") from None


def loads(data: bytes, name: PathLike = "<bytes>") -> Any:
    """Unpickle ``data`` through the allow-list; errors name ``name``."""
    return _load_stream(io.BytesIO(data), name)


# --------------------------------------------------------------------------- helpers
def to_plain(value: Any) -> Any:
    """Recursively turn EasyDicts/OrderedDicts into dicts, tuples into lists and numpy
    scalars into Python numbers (for configuration values such as ``_init_kwargs``)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def module_tensors(record: PersistentRecord, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Flatten a persisted torch module into a ``state_dict``-style mapping.

    Raises ValueError where the record does not look like a torch module.

    Walks ``_parameters``, ``_buffers`` (minus ``_non_persistent_buffers_set``) and
    ``_modules`` recursively, with dotted names, in the order ``state_dict`` uses.
    """
    state = record.state
    out: Dict[str, torch.Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in _dict_entry(state, group, record).items():
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{prefix}{name} of {record.class_name} is not a tensor")
            out[prefix + name] = tensor
    for name, child in _dict_entry(state, "_modules", record).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise ValueError(f"sub-module {prefix}{name} of {record.class_name} is not a network module")
        out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def _dict_entry(state: Dict[str, Any], key: str, record: PersistentRecord) -> Dict[str, Any]:
    value = state.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{record.class_name}.{key} is not a dict")
    return value


def walk_records(record: PersistentRecord, prefix: str = "") -> Sequence[Tuple[str, PersistentRecord]]:
    """All persisted sub-modules of ``record`` (itself first) as ``(dotted name, record)``."""
    found = [(prefix, record)]
    for name, child in (record.state.get("_modules") or {}).items():
        if isinstance(child, PersistentRecord):
            found.extend(walk_records(child, f"{prefix}.{name}" if prefix else name))
    return found
