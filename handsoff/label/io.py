"""The labeler file: weights and configuration, tied to the generator whose features it reads.

One safetensors file::

    tensors   the labeler's state dict (stacked member weights, BatchNorm statistics), float32
    metadata  format            "handsoff-labeler"
              version           "1"
              generator_digest  `handsoff.gan.digest.generator_digest` of the generator
              config            JSON of `LabelerConfig.to_dict()`
              extra             JSON object (free-form: training settings, held-out scores, ...)

`handsoff fit-labeler` writes it; the generation engine reads it with `load_labeler`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from handsoff.errors import HandsoffError
from handsoff.gan.digest import generator_digest
from handsoff.label.model import HypercolumnLabeler, LabelerConfig
from handsoff.utils.io import save_safetensors

__all__ = ["LABELER_FORMAT", "save_labeler", "load_labeler", "read_labeler_metadata"]

PathLike = Union[str, "os.PathLike[str]"]
LABELER_FORMAT = "handsoff-labeler"
_VERSION = "1"


def save_labeler(path: PathLike, labeler: HypercolumnLabeler, G: torch.nn.Module,
                 extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``labeler`` (trained on ``G``'s features) atomically to ``path`` (.safetensors).

    Args:
        path: destination; written to a temporary file beside it and renamed into place.
        labeler: the labeler.
        G: its generator (only its digest is stored).
        extra: JSON-able record kept in the metadata (`read_labeler_metadata` returns it).
    """
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in labeler.state_dict().items()}
    metadata = {"format": LABELER_FORMAT, "version": _VERSION, "generator_digest": generator_digest(G),
                "config": json.dumps(labeler.config.to_dict(), sort_keys=True),
                "extra": json.dumps(dict(extra or {}), sort_keys=True)}
    save_safetensors(path, tensors, metadata)
    return Path(path)


def read_labeler_metadata(path: PathLike) -> dict[str, Any]:
    """``{"generator_digest", "config" (LabelerConfig), "extra" (dict)}`` of a labeler file, weights unread.

    Raises:
        HandsoffError: one line naming ``path``: missing, unreadable, not a labeler, bad metadata.
    """
    return _read(Path(path), tensors=False)[0]


def load_labeler(path: PathLike, G: Optional[torch.nn.Module] = None,
                 device: torch.device | str = "cpu") -> HypercolumnLabeler:
    """Read a labeler file; with ``G``, refuse it unless it was trained on ``G``.

    The returned labeler is in eval mode on ``device``; ``labeler.extra`` holds the file's
    extra record and ``labeler.generator_digest`` the digest it was made for.

    Raises:
        HandsoffError: one line naming ``path``: missing or corrupt file, another format or
            version, weights that do not fit the configuration, or another generator.
    """
    p = Path(path)
    meta, tensors = _read(p, tensors=True)
    if G is not None:
        digest = generator_digest(G)
        if meta["generator_digest"] != digest:
            raise HandsoffError(f"{p}: trained for another generator (digest {meta['generator_digest'] or 'missing'}, "
                                f"this generator is {digest}); fit a labeler for this generator")
    labeler = HypercolumnLabeler(meta["config"])
    try:
        labeler.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        problem = " ".join(str(err).split())[:200]
        raise HandsoffError(f"{p}: weights do not fit its configuration ({problem})") from None
    labeler.generator_digest = meta["generator_digest"]
    labeler.extra = meta["extra"]
    return labeler.eval().requires_grad_(False).to(device)


def _read(p: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not p.is_file():
        raise HandsoffError(f"{p}: no such labeler file")
    try:
        with safe_open(os.fspath(p), framework="pt") as f:
            metadata: Mapping[str, str] = f.metadata() or {}
            if metadata.get("format") != LABELER_FORMAT:
                raise HandsoffError(f"{p}: not a handsoff labeler file (write one with `handsoff fit-labeler`)")
            weights = {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise HandsoffError(f"{p}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if metadata.get("version") != _VERSION:
        raise HandsoffError(f"{p}: labeler version {metadata.get('version')!r} is not supported (want {_VERSION})")
    try:
        config = LabelerConfig.from_dict(json.loads(metadata.get("config", "")))
        extra = json.loads(metadata.get("extra", "{}"))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise HandsoffError(f"{p}: corrupt labeler configuration ({' '.join(str(err).split())})") from None
    meta = {"generator_digest": metadata.get("generator_digest", ""), "config": config,
            "extra": extra if isinstance(extra, dict) else {}}
    return meta, weights
