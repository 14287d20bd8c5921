"""A model trained on the labeled images, used on other images: agreement scores and self-training labels.

Two things a user does with the baseline model (`handsoff.bench.train.train_and_score` on the
labeled images alone, ``return_model=True``), both one task at a time:

* **Agreement filtering** (`agreement_scores`, `keep_most_agreeing`): score each generated
  sample by how well the labels it carries agree with the model's prediction on its image,
  and keep the most agreeing share. The generator's labels and the model's errors come from
  different places (an inversion that moved a part; a model that saw 16 images), so where
  they agree the label is likely right. Per task:

  - seg: mean IoU between the two class maps over the classes present in either
    (pixels labelled 255 left out);
  - keypoints: the share of the sample's visible keypoints within ``0.05 * max(H, W)`` of the
    model's (PCK@0.05 of the labels against the prediction; 0 without visible points);
  - depth: minus the RMSE of log depth over the pixels with a valid label.

* **Self-training** (`Relabeled`): the same images with the model's predictions as their
  labels (seg: argmax class map; keypoints: decoded points, all marked visible; depth: the
  predicted depth) - pseudo-labels, what a user would do instead of handsoff.

Predictions are made once, in eval mode, without augmentation, on the images as stored.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from handsoff.bench.tasks import TASKS, Task
from handsoff.data.folder_dataset import VISIBLE_THRESHOLD
from handsoff.data.labeled_set import IGNORE_INDEX
from handsoff.errors import HandsoffError

__all__ = ["AGREEMENT_PCK", "predict_dataset", "agreement_scores", "keep_most_agreeing", "Relabeled"]

#: Keypoints agree when they are within this share of the image's larger side.
AGREEMENT_PCK = 0.05


def _as_task(task: Union[Task, str]) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise HandsoffError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[task]


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, task: Union[Task, str], dataset: Dataset, *, batch: int = 64,
                    device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """The model's predictions for every image of ``dataset``, in order.

    Returns:
        seg: uint8 class maps ``[N, H, W]``; keypoints: float32 ``[N, K, 2]`` (x, y in pixels);
        depth: float32 ``[N, H, W]``.
    """
    task = _as_task(task)
    device = torch.device(device)
    model.eval()
    parts = []
    for start in range(0, len(dataset), batch):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch, len(dataset)))])
        images = images.to(device).float().div_(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)
        parts.append(task.predict(model(images)))
    if not parts:
        raise HandsoffError("cannot predict labels for an empty set")
    return np.concatenate(parts)


def _seg_agreement(label: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    valid = label != IGNORE_INDEX
    a, b = label[valid].astype(np.int64), predicted[valid].astype(np.int64)
    if a.size == 0:
        return 0.0
    both = np.bincount(a[a == b], minlength=n_classes)
    union = np.bincount(a, minlength=n_classes) + np.bincount(b, minlength=n_classes) - both
    present = union > 0
    return float((both[present] / union[present]).mean())


def _keypoint_agreement(label: np.ndarray, predicted: np.ndarray, size: tuple[int, int]) -> float:
    visible = label[:, 2] >= VISIBLE_THRESHOLD
    if not visible.any():
        return 0.0
    distance = np.linalg.norm(label[visible, :2] - predicted[visible], axis=-1)
    return float((distance <= AGREEMENT_PCK * max(size)).mean())


def _depth_agreement(label: np.ndarray, predicted: np.ndarray) -> float:
    valid = np.isfinite(label) & (label > 0) & np.isfinite(predicted) & (predicted > 0)
    if not valid.any():
        return -np.inf
    return -float(np.sqrt(np.mean((np.log(label[valid]) - np.log(predicted[valid])) ** 2)))


def agreement_scores(dataset: Dataset, task: Union[Task, str], predictions: np.ndarray) -> np.ndarray:
    """float64 ``[N]``: how well each sample's ``task`` labels agree with ``predictions``
    (`predict_dataset` of the same dataset); higher agrees more (module docstring)."""
    task = _as_task(task)
    if len(predictions) != len(dataset):
        raise HandsoffError(f"{len(predictions)} predictions for a set of {len(dataset)} samples")
    scores = np.empty(len(dataset), np.float64)
    for i in range(len(dataset)):
        item = dataset[i]
        size = tuple(item["image"].shape[-2:])
        label = task.target([item], size)[0].numpy()
        if task.name == "seg":
            scores[i] = _seg_agreement(label, predictions[i], int(max(label.max(initial=0), predictions[i].max()) + 1))
        elif task.name == "keypoints":
            scores[i] = _keypoint_agreement(label, predictions[i], size)
        else:
            scores[i] = _depth_agreement(label, predictions[i])
    return scores


def keep_most_agreeing(dataset: Dataset, scores: np.ndarray, keep: float) -> Subset:
    """The ``round(keep * N)`` samples (at least one) of ``dataset`` whose ``scores`` are highest, in order.

    Agreement scores are coarse (a share of a few keypoints), so ties are common: they are
    broken by position (corpus order is seed order, unrelated to the content), and the share
    kept is always the one asked.
    """
    if not 0.0 < keep <= 1.0:
        raise HandsoffError(f"the share to keep must be in (0, 1], got {keep}")
    if len(scores) != len(dataset):
        raise HandsoffError(f"{len(scores)} agreement scores for a set of {len(dataset)} samples")
    if len(scores) == 0:
        return Subset(dataset, [])
    count = max(1, round(keep * len(scores)))
    best = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:count]
    return Subset(dataset, np.sort(best).tolist())


class Relabeled(Dataset):
    """``dataset`` with its ``task`` labels replaced by ``predictions`` (self-training).

    Items are the underlying items with the one label swapped: seg int64 ``[H, W]``, keypoints
    float32 ``[K, 3]`` (all visible), depth float32 ``[H, W]``. The set reads as the folder
    underneath (``root``) to the benchmark's checks and records, with the class and keypoint
    names of the model that predicted (``classes``, ``keypoint_names``; default: the folder's),
    so a folder of images without labels can be self-trained on.
    """

    def __init__(self, dataset: Dataset, task: Union[Task, str], predictions: np.ndarray, *,
                 classes: Optional[Sequence[str]] = None, keypoint_names: Optional[Sequence[str]] = None) -> None:
        from handsoff.bench.data import leaves

        if len(predictions) != len(dataset):
            raise HandsoffError(f"{len(predictions)} predictions for a set of {len(dataset)} samples")
        bases = [base for _, base in leaves(dataset)]
        if any(getattr(base, "augment", False) for base in bases):
            raise HandsoffError("self-training labels are predicted on the images as stored: open the set "
                                "without augmentation")
        self.dataset, self.task, self.predictions = dataset, _as_task(task), predictions
        self.root = getattr(bases[0], "root", None)
        self.classes = tuple(classes if classes is not None else getattr(bases[0], "classes", ()))
        self.keypoint_names = tuple(keypoint_names if keypoint_names is not None
                                    else getattr(bases[0], "keypoint_names", ()))
        self.augment = False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        predicted = torch.from_numpy(np.asarray(self.predictions[i]))
        if self.task.name == "seg":
            item["seg"] = predicted.to(torch.int64)
        elif self.task.name == "keypoints":
            item["keypoints"] = torch.cat([predicted.float(), torch.ones(len(predicted), 1)], 1)
        else:
            item["depth"] = predicted.float()
        return item
