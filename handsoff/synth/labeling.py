"""The trained labeler (`handsoff.label`) as the engine's labeling callable."""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import torch

from handsoff.synth.engine import LabelerInfo, LabelFn
from handsoff.utils.io import PathLike, sha256_file

if TYPE_CHECKING:
    from handsoff.label.model import HypercolumnLabeler

__all__ = ["load_labeling", "labeler_info"]


def labeler_info(labeler: "HypercolumnLabeler", digest: str) -> LabelerInfo:
    """What ``labeler`` predicts, from its `LabelerConfig`."""
    config = labeler.config
    return LabelerInfo(classes=config.classes, keypoint_names=config.keypoint_names, depth=config.depth,
                       digest=digest, resolution=config.label_resolution)


def load_labeling(path: PathLike, G: torch.nn.Module, device: Union[str, torch.device] = "cpu",
                  noise_mode: str = "const") -> tuple[LabelFn, LabelerInfo]:
    """Load the labeler file ``path`` for ``G`` and return ``(label_fn, info)`` for `generate_corpus`.

    ``label_fn(ws)`` synthesises the W+ codes with ``G`` (``noise_mode``) and labels them
    (`handsoff.label.infer.label_ws`: images and labels at the labeler's label resolution);
    ``info.digest`` is the first 16 hex digits of the file's sha256.

    Raises:
        HandsoffError: the file is not a labeler, or was made for another generator.
    """
    from handsoff.label.infer import label_ws
    from handsoff.label.io import load_labeler

    labeler = load_labeler(path, G=G, device=device)
    info = labeler_info(labeler, sha256_file(path)[:16])

    def label_fn(ws: torch.Tensor):
        return label_ws(G, labeler, ws, noise_mode=noise_mode)

    return label_fn, info
