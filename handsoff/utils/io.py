"""Atomic writes and file digests: nothing half-written is ever left under a final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

# Read once at import: os.umask can only be read by setting it, which races with other threads.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary file lives in the same directory so that ``os.replace`` is atomic; on any
    error it is removed and ``path`` is left exactly as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates files 0600; give the result the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata.

    The safetensors library writes the header's metadata in hash-map order, which changes from
    run to run: the same weights gave files of other bytes and other sha256, so stages that digest
    their inputs reran. The header is rewritten here with sorted keys (tensor offsets are relative
    to the data, which follows the header, so the data bytes stay as they are).

    Args:
        tensors: name -> contiguous CPU torch tensor.
        metadata: string -> string, stored under ``__metadata__``.
    """
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes, with spaces
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


def save_safetensors(path: PathLike, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `safetensors_bytes` of ``tensors`` and ``metadata`` to ``path`` atomically."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))

