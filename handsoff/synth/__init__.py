"""The generation engine: labeled corpora from a generator and a labeler (DESIGN.md section 6).

::

    from handsoff.synth import GenerateSettings, generate
    result = generate("labeler.safetensors", "corpus/", GenerateSettings(n=10_000), batch=16)
    # corpus/: shard-00000.h5 ..., manifest.json, preview.png, report.json
    from handsoff.data import ShardDataset
    dataset = ShardDataset("corpus/")          # dicts of tensors: image, seg, depth, keypoints, ...

Modules: `settings` (what a corpus is), `sampling` (latents from seeds, ``--around``),
`engine` (`generate_corpus`: label, filter, write shards, resume), `generation` (`generate`:
the same from checkpoint paths, torchrun-aware), `export` (to the labeled-set folder format),
`stages` / `pipeline` / `demo` (``handsoff run`` and ``handsoff demo``), `cli`.
Names below are imported lazily (``handsoff --help`` imports nothing heavy).
"""
from __future__ import annotations

from handsoff.utils.lazy import lazy_exports

_EXPORTS = {
    "GenerateSettings": "handsoff.synth.settings",
    "LabelerInfo": "handsoff.synth.engine",
    "GenerateResult": "handsoff.synth.engine",
    "generate_corpus": "handsoff.synth.engine",
    "generate": "handsoff.synth.generation",
    "load_labeling": "handsoff.synth.labeling",
    "export_folder": "handsoff.synth.export",
    "load_config": "handsoff.synth.pipeline",
    "run_pipeline": "handsoff.synth.pipeline",
    "run_demo": "handsoff.synth.demo",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
