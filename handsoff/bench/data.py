"""Training sets for the benchmark: opening folders and corpora, filtering, and checking them.

A training set is a ``torch.utils.data.Dataset`` whose items are dicts as
`handsoff.data.shards.ShardDataset` and `handsoff.data.folder_dataset.LabeledFolderDataset`
return them; ``Subset`` and ``ConcatDataset`` of those work too (their class and keypoint
names are read from the datasets underneath).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from handsoff.bench.tasks import Task
from handsoff.data.folder_dataset import LabeledFolderDataset
from handsoff.errors import HandsoffError

__all__ = ["is_corpus", "open_train_set", "uncertainties", "filter_by_uncertainty", "leaves", "describe",
           "check_train_sets"]

PathLike = Union[str, "os.PathLike[str]"]


def is_corpus(path: PathLike) -> bool:
    """Whether ``path`` is a generated corpus folder (it has a manifest.json) rather than a labeled set."""
    from handsoff.data.shards import MANIFEST_NAME

    return (Path(path) / MANIFEST_NAME).is_file()


def open_train_set(path: PathLike, *, augment: bool = True, seed: int = 0,
                   max_uncertainty_quantile: Optional[float] = None) -> Dataset:
    """A training set from a folder: a shard corpus or a labeled-set folder.

    Args:
        path: a corpus folder (with manifest.json) or a labeled-set folder (with images/).
        augment: augment a labeled-set folder (`LabeledFolderDataset`); corpora are used as
            generated (they are large and already varied).
        seed: augmentation seed (a training run reseeds it from its own seed anyway).
        max_uncertainty_quantile: for a corpus, keep only the samples whose uncertainty is at
            most this quantile of the corpus's uncertainties (0.9 drops the 10% most
            uncertain); ignored for a labeled-set folder, whose labels are exact.

    Raises:
        HandsoffError: the folder is neither, or cannot be read (the message names it).
    """
    root = Path(path)
    if not root.is_dir():
        raise HandsoffError(f"{root}: no such folder")
    if is_corpus(root):
        from handsoff.data.shards import ShardDataset

        corpus: Dataset = ShardDataset(root)
        if max_uncertainty_quantile is not None:
            corpus = filter_by_uncertainty(corpus, max_uncertainty_quantile)
        return corpus
    if (root / "images").is_dir():
        return LabeledFolderDataset(root, augment=augment, seed=seed)
    raise HandsoffError(f"{root}: neither a generated corpus (manifest.json) nor a labeled-set folder (images/)")


def uncertainties(dataset: Dataset) -> np.ndarray:
    """float32 ``[N]`` uncertainty of every sample (shards read without touching the images)."""
    from handsoff.data.shards import ShardDataset

    if isinstance(dataset, ShardDataset):
        import h5py

        parts = []
        for entry in dataset.manifest.shards:
            with h5py.File(dataset.root / entry.file, "r") as f:
                parts.append(f["uncertainty"][()])
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return np.array([float(dataset[i]["uncertainty"]) for i in range(len(dataset))], np.float32)


def filter_by_uncertainty(dataset: Dataset, quantile: float) -> Subset:
    """The samples of ``dataset`` whose uncertainty is at most its ``quantile`` (in (0, 1]).

    Ties at the threshold are kept, so a constant uncertainty keeps everything.
    """
    if not 0.0 < quantile <= 1.0:
        raise HandsoffError(f"the uncertainty quantile must be in (0, 1], got {quantile}")
    scores = uncertainties(dataset)
    if len(scores) == 0:
        return Subset(dataset, [])
    keep = np.flatnonzero(scores <= np.quantile(scores, quantile))
    return Subset(dataset, keep.tolist())


def leaves(dataset: Dataset) -> Iterator[tuple[Dataset, Any]]:
    """``(dataset, its base)`` for every part of a (nested) ConcatDataset; the base of a
    Subset is the dataset it selects from (which holds ``classes``, ``root``, ...)."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from leaves(part)
        return
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    yield dataset, base


def describe(dataset: Dataset) -> dict[str, Any]:
    """What a results file records about one training set: kind, path, size, augmentation."""
    parts = []
    for part, base in leaves(dataset):
        parts.append({
            "kind": "labeled folder" if isinstance(base, LabeledFolderDataset) else
                    "corpus" if type(base).__name__ == "ShardDataset" else
                    "teacher-labeled (self-training)" if type(base).__name__ == "Relabeled" else type(base).__name__,
            "path": str(getattr(base, "root", "")) or None,
            "size": len(part),
            "base_size": len(base),
            "augment": bool(getattr(base, "augment", False)),
        })
    return parts[0] if len(parts) == 1 else {"kind": "concat", "size": len(dataset), "parts": parts}


def _name(base: Any) -> str:
    root = getattr(base, "root", None)
    return str(root) if root is not None else f"training set ({type(base).__name__})"


def _size_text(size: Sequence[int]) -> str:
    return f"{size[1]}x{size[0]}"


def check_train_sets(train_sets: Sequence[Dataset], task: Task, size: tuple[int, int],
                     classes: tuple[str, ...], keypoint_names: tuple[str, ...], test_name: str) -> None:
    """Refuse training sets that cannot train a model for the test set.

    Every part must be non-empty, hold the task's labels, have images of the test size and,
    for seg / keypoints, the test set's class / keypoint names in the same order.

    Raises:
        HandsoffError: one line naming the offending folder and the problem.
    """
    if not train_sets:
        raise HandsoffError("no training set given")
    for dataset in train_sets:
        for part, base in leaves(dataset):
            name = _name(base)
            if len(part) == 0:
                raise HandsoffError(f"{name}: the training set is empty")
            first = part[0]
            if task.name not in first:
                raise HandsoffError(f"{name}: has no {task.name} labels ({task.label_folder}), "
                                    f"needed for task {task.name!r}")
            got = tuple(first["image"].shape[-2:])
            if got != tuple(size):
                raise HandsoffError(f"{name}: images are {_size_text(got)} but the test set's ({test_name}) "
                                    f"are {_size_text(size)}")
            wanted = {"seg": ("classes", classes), "keypoints": ("keypoint_names", keypoint_names)}.get(task.name)
            if wanted is not None:
                attr, expected = wanted
                have = tuple(getattr(base, attr, ()))
                if have != tuple(expected):
                    label = "class names" if attr == "classes" else "keypoint names"
                    raise HandsoffError(f"{name}: {label} {list(have)} differ from the test set's "
                                        f"({test_name}) {list(expected)}")
