"""Labeled-set readers and writers (the folder format of DESIGN.md section 6)."""
from __future__ import annotations

from handsoff.data.labeled_set import (
                                       IGNORE_INDEX,
                                       IMAGE_SUFFIXES,
                                       LabeledSet,
                                       read_labeled_set,
                                       render_to_folder,
                                       write_labeled_set,
)

__all__ = ["IGNORE_INDEX", "IMAGE_SUFFIXES", "LabeledSet", "read_labeled_set", "render_to_folder", "write_labeled_set"]
