"""GAN inversion: images -> W+ codes of a generator.

Modules:
    encoder   the pSp-like encoder and its file format (`Encoder`, `save_encoder`, `load_encoder`)
    train     its two training stages (`fit_encoder`)
    invert    encoding + per-image refinement + metrics (`invert_images`)
    lpips     LPIPS with real ImageNet backbones, offline (`load_lpips`)
    latents   the latents file (`Latents`, `save_latents`, `load_latents`)
    cli       ``handsoff fit-encoder`` and ``handsoff invert``

The names below are imported on first access, so importing this package stays cheap.
"""
from __future__ import annotations

from handsoff.utils.lazy import lazy_exports

_EXPORTS = {
    "Encoder": "handsoff.invert.encoder",
    "save_encoder": "handsoff.invert.encoder",
    "load_encoder": "handsoff.invert.encoder",
    "fit_encoder": "handsoff.invert.train",
    "invert_images": "handsoff.invert.invert",
    "InversionResult": "handsoff.invert.invert",
    "load_lpips": "handsoff.invert.lpips",
    "Latents": "handsoff.invert.latents",
    "save_latents": "handsoff.invert.latents",
    "load_latents": "handsoff.invert.latents",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
