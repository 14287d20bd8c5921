"""handsoff: turn fewer than 50 labeled images into an unlimited labeled image corpus.

The public API is imported lazily so that ``handsoff --help`` and light tools do not pay
for importing torch::

    import handsoff
    G = handsoff.load_generator("model.pkl", device="cpu")
    ws = G.mapping(z, truncation_psi=0.7)
    img = G.synthesis(ws, noise_mode="const")
"""
from __future__ import annotations

from handsoff.utils.lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "Generator": "handsoff.gan.networks",
    "GeneratorConfig": "handsoff.gan.config",
    "load_generator": "handsoff.gan.checkpoints",
    "save_generator": "handsoff.gan.checkpoints",
    "checkpoint_info": "handsoff.gan.checkpoints",
    "HandsoffError": "handsoff.errors",
    "CheckpointError": "handsoff.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
