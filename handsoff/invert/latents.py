"""The latents file: W+ codes of a set of images, tied to the generator that made them.

One safetensors file::

    tensors   ws        float32 [N, num_ws, w_dim]
    metadata  format            "handsoff-latents"
              version           "1"
              generator_digest  `handsoff.gan.digest.generator_digest` of the generator
              names             JSON list of N image names (file stems), in the order of ws
              extra             JSON object (free-form: per-image LPIPS/PSNR, settings, ...)

`handsoff invert` writes it; `handsoff tune` writes the same codes stamped for the tuned generator;
`handsoff fit-labeler` and `handsoff generate --around` read it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from handsoff.errors import HandsoffError
from handsoff.utils.io import save_safetensors

__all__ = ["Latents", "save_latents", "load_latents", "LATENTS_FORMAT"]

PathLike = Union[str, "os.PathLike[str]"]
LATENTS_FORMAT = "handsoff-latents"
_VERSION = "1"


@dataclass(frozen=True)
class Latents:
    """W+ codes of named images.

    Attributes:
        ws: float32 ``[N, num_ws, w_dim]``.
        names: the image names, one per row of ``ws``.
        generator_digest: digest of the generator the codes belong to.
        extra: free-form JSON-able record (metrics, settings).
    """

    ws: torch.Tensor
    names: list[str]
    generator_digest: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def select(self, names: Sequence[str], path: PathLike = "<latents>") -> torch.Tensor:
        """Rows of ``ws`` for ``names``, in that order; a missing name is an error naming ``path``."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise HandsoffError(f"{os.fspath(path)}: has no latents for image(s) {shown}")
        return self.ws[[index[n] for n in names]]


def save_latents(path: PathLike, latents: Latents) -> Path:
    """Write ``latents`` atomically to ``path`` (a .safetensors file)."""
    ws = latents.ws.detach().to("cpu", torch.float32).contiguous()
    if ws.ndim != 3 or ws.shape[0] != len(latents.names):
        raise ValueError(f"ws must be [N={len(latents.names)}, num_ws, w_dim], got {tuple(ws.shape)}")
    metadata = {"format": LATENTS_FORMAT, "version": _VERSION, "generator_digest": latents.generator_digest,
                "names": json.dumps(list(latents.names)), "extra": json.dumps(latents.extra)}
    save_safetensors(path, {"ws": ws}, metadata)
    return Path(path)


def load_latents(path: PathLike, expect_digest: Optional[str] = None,
                 expect_shape: Optional[tuple[int, int]] = None) -> Latents:
    """Read a latents file, checking its format and, when given, the generator it belongs to.

    Args:
        path: the .safetensors file.
        expect_digest: refuse the file unless it was made for the generator with this digest.
        expect_shape: refuse the file unless ``ws`` is ``[N, *expect_shape]`` (num_ws, w_dim).

    Raises:
        HandsoffError: one line naming ``path`` and the problem.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise HandsoffError(f"{p}: no such latents file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata: Mapping[str, str] = f.metadata() or {}
            if metadata.get("format") != LATENTS_FORMAT or "ws" not in f.keys():
                raise HandsoffError(f"{p}: not a handsoff latents file (write one with `handsoff invert`)")
            ws = f.get_tensor("ws")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise HandsoffError(f"{p}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if metadata.get("version") != _VERSION:
        raise HandsoffError(f"{p}: latents version {metadata.get('version')!r} is not supported (want {_VERSION})")
    try:
        names = json.loads(metadata.get("names", ""))
        extra = json.loads(metadata.get("extra", "{}"))
    except json.JSONDecodeError:
        raise HandsoffError(f"{p}: corrupt metadata (names/extra are not JSON)") from None
    if not isinstance(names, list) or ws.ndim != 3 or len(names) != ws.shape[0]:
        raise HandsoffError(f"{p}: {len(names) if isinstance(names, list) else '?'} names for ws of shape "
                            f"{tuple(ws.shape)}")
    digest = metadata.get("generator_digest", "")
    if expect_digest is not None and digest != expect_digest:
        raise HandsoffError(f"{p}: made for another generator (digest {digest or 'missing'}, this generator "
                            f"is {expect_digest}); invert the images again with this generator (for a generator "
                            f"from `handsoff tune`, use the latents.safetensors written beside it)")
    if expect_shape is not None and tuple(ws.shape[1:]) != tuple(expect_shape):
        raise HandsoffError(f"{p}: ws are {tuple(ws.shape[1:])} per image, the generator needs {tuple(expect_shape)}")
    return Latents(ws.float(), [str(n) for n in names], digest, extra if isinstance(extra, dict) else {})
