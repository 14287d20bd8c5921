"""Labeled-set readers and writers (the folder format of DESIGN.md section 6), and two torch
Datasets with the same item dicts: `ShardDataset` over a generated corpus and
`LabeledFolderDataset` over a labeled-set folder (both imported lazily: they need torch/h5py)."""
from __future__ import annotations

from handsoff.data.labeled_set import (IGNORE_INDEX, IMAGE_SUFFIXES, LabeledSet, read_labeled_set, render_to_folder,
                                       write_labeled_set)
from handsoff.utils.lazy import lazy_exports

# Public name -> module, imported on first access.
_LAZY = {"ShardDataset": "handsoff.data.shards", "LabeledFolderDataset": "handsoff.data.folder_dataset"}

__all__ = ["IGNORE_INDEX", "IMAGE_SUFFIXES", "LabeledSet", "read_labeled_set", "render_to_folder", "write_labeled_set",
           "ShardDataset", "LabeledFolderDataset"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
