"""Train a downstream model on one or more training sets and score it on a real test set.

The schedule is fixed in optimizer steps, not epochs, so every training set, of 16 images
or of 10,000, gets the same compute: ``steps`` AdamW steps of ``batch`` samples drawn
uniformly from the union of the training sets (a fresh random permutation per pass),
learning rate warmed up linearly over the first 5% of the steps and then decayed to 0 on a
cosine. Images enter the model as float in [-1, 1]. The model is evaluated once, after the
last step, in eval mode (BatchNorm running statistics).

What users do besides, each one option of `train_and_score` (and of ``handsoff bench``), all
combinable:

* ``mix``: fixed shares of every batch per training set instead of uniform over the union
  (`batch_indices`): ``mix=0.5`` makes the last training set (say the labeled images) half of
  every batch, the others sharing the rest, uniform over their union;
* ``finetune``: after the first stage, a second one on other sets (say the labeled images),
  ``finetune_steps`` steps with a warm-up and cosine of its own at ``finetune_lr``;
* ``pretrained``: the UNet's encoder is an ImageNet VGG's first blocks
  (`handsoff.bench.pretrained`), trained at `PRETRAINED_LR_FACTOR` of the learning rate.

Everything random (weights, sample order, augmentation) follows from ``seed``; torch's
global random state of the caller is left as it was.
"""
from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from handsoff import __version__
from handsoff.bench.data import check_train_sets, describe, leaves
from handsoff.bench.defaults import (DEFAULT_BASE, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_PRETRAINED_BLOCKS,
                                     DEFAULT_STEPS, FINETUNE_LR_FACTOR, FINETUNE_STEPS_FRACTION,
                                     PRETRAINED_LR_FACTOR)
from handsoff.bench.models import OutputAffine, PretrainedUNet, build_model, count_parameters
from handsoff.bench.tasks import TASKS, Task, score
from handsoff.data.folder_dataset import LabeledFolderDataset
from handsoff.data.labeled_set import LabeledSet, read_labeled_set
from handsoff.errors import HandsoffError

__all__ = ["DEFAULT_STEPS", "DEFAULT_BATCH", "DEFAULT_LR", "DEFAULT_BASE", "RESULT_FORMAT", "Mix", "mix_shares",
           "batch_indices", "train_and_score", "evaluate"]

PathLike = Union[str, "os.PathLike[str]"]
#: Shares of every batch per training set: None (uniform over the union), the last set's share,
#: or one share per set (`mix_shares`).
Mix = Union[None, float, Sequence[float]]

WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.05
RESULT_FORMAT = "handsoff-bench"
_CURVE_POINTS = 50
_CALIBRATION_SAMPLES = 256


def _test_set(test: LabeledSet | PathLike, task: Task) -> LabeledFolderDataset:
    test_set = test if isinstance(test, LabeledSet) else read_labeled_set(test)
    labels = {"seg": test_set.seg, "depth": test_set.depth, "keypoints": test_set.keypoints}[task.name]
    if labels is None or (task.name == "keypoints" and not test_set.keypoint_names):
        raise HandsoffError(f"{test_set.root}: the test set has no {task.name} labels ({task.label_folder})")
    return LabeledFolderDataset(test_set, augment=False)


def _index_stream(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless sample indices: one random permutation of ``range(n)`` after another."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def mix_shares(n_sets: int, mix: Mix) -> Optional[list[tuple[list[int], float]]]:
    """The groups of training sets that ``mix`` asks for, each with its share of every batch.

    * None: None, every sample drawn uniformly from the union of the sets;
    * a number ``p`` in (0, 1): the last set is ``p`` of every batch, the other sets together
      ``1 - p``, uniform over their union (``--train corpus/ --train labeled/ --mix 0.5``);
    * one share per set (each >= 0, summing to 1): each set its own share.

    Raises:
        HandsoffError: a share out of range, a list of the wrong length, or fewer than two sets.
    """
    if mix is None:
        return None
    if isinstance(mix, (int, float)):
        p = float(mix)
        if n_sets < 2:
            raise HandsoffError(f"--mix {mix}: needs at least two training sets (the last one gets the share)")
        if not 0.0 < p < 1.0:
            raise HandsoffError(f"--mix {mix}: the last training set's share of every batch must be in (0, 1)")
        return [(list(range(n_sets - 1)), 1.0 - p), ([n_sets - 1], p)]
    shares = [float(x) for x in mix]
    if len(shares) != n_sets:
        raise HandsoffError(f"--mix {','.join(map(str, shares))}: {len(shares)} shares for {n_sets} training sets "
                            "(give one number, the last set's share, or one share per set)")
    if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
        raise HandsoffError(f"--mix {','.join(map(str, shares))}: the shares must be >= 0 and sum to 1")
    return [([k], share) for k, share in enumerate(shares)]


def batch_indices(sizes: Sequence[int], batch: int, seed: int, mix: Mix = None) -> Iterator[list[int]]:
    """Endless batches of indices into the concatenation of training sets of ``sizes``.

    Without ``mix``, ``batch`` draws from one random permutation of the union after another.
    With it, each group of sets (`mix_shares`) gets ``floor(batch * share)`` samples of every
    batch from its own stream of permutations, and the slots left over go to the groups
    furthest behind their share so far: every batch holds each group's share to within one
    sample, and the samples seen hold it exactly up to one sample over the whole run.
    """
    groups = mix_shares(len(sizes), mix)
    if groups is None:
        stream = _index_stream(int(sum(sizes)), torch.Generator().manual_seed(seed))
        while True:
            yield [next(stream) for _ in range(batch)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    pools = [np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in sets]) for sets, _ in groups]
    shares = np.array([share for _, share in groups])
    for pool, (sets, share) in zip(pools, groups):
        if share > 0 and len(pool) == 0:
            raise HandsoffError(f"--mix: training set {sets[0] + 1} is empty but asked for {share:.0%} of every batch")
    streams = [_index_stream(len(pool), torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, g]).generate_state(1)[0]))) for g, pool in enumerate(pools)]
    base = np.floor(batch * shares + 1e-9).astype(int)
    fractional = np.flatnonzero(batch * shares - base > 1e-9)
    assigned = np.zeros(len(groups))
    step = 0
    while True:
        step += 1
        counts = base.copy()
        extra = batch - int(base.sum())
        if extra:
            behind = step * batch * shares - (assigned + counts)
            counts[fractional[np.argsort(-behind[fractional], kind="stable")[:extra]]] += 1
        assigned += counts
        yield [int(pools[g][next(streams[g])]) for g in range(len(groups)) for _ in range(counts[g])]


def _images(items: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    # channels_last: measured 20% faster for these small convolutions on the CPU (oneDNN).
    images = torch.stack([item["image"] for item in items]).to(device).float().div_(127.5).sub_(1.0)
    return images.contiguous(memory_format=torch.channels_last)


def _schedule(steps: int) -> Any:
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def _reseed_augmentation(train_sets: Sequence[Dataset], seed: int) -> None:
    for k, dataset in enumerate(train_sets):
        for j, (_, base) in enumerate(leaves(dataset)):
            if hasattr(base, "reseed"):
                base.reseed(int(np.random.SeedSequence([seed, k, j]).generate_state(1)[0]))


def _calibrated(model: torch.nn.Module, task: Task, data: Dataset, size: tuple[int, int]) -> torch.nn.Module:
    """Wrap ``model`` in the task's output scale, fitted on up to 256 evenly spaced training samples."""
    if task.calibrate is None:
        return model
    picks = np.linspace(0, len(data) - 1, min(len(data), _CALIBRATION_SAMPLES)).round().astype(int)
    scale, shift = task.calibrate(task.target([data[int(i)] for i in picks], size))
    return OutputAffine(model, scale, shift)


def _param_groups(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """One AdamW group at ``lr``, and a pretrained encoder's at ``lr * PRETRAINED_LR_FACTOR``."""
    pretrained = [m for m in model.modules() if isinstance(m, PretrainedUNet)]
    slow = {id(p) for m in pretrained for p in m.pretrained_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in slow], "lr": lr}]
    if slow:
        groups.append({"params": [p for p in model.parameters() if id(p) in slow], "lr": lr * PRETRAINED_LR_FACTOR})
    return groups


def _train(model: torch.nn.Module, task: Task, data: Dataset, batches: Iterator[list[int]], sizes: Sequence[int], *,
           steps: int, lr: float, device: torch.device, progress: bool, first_step: int = 0, desc: str = ""
           ) -> tuple[list[list[float]], float, list[int]]:
    """Run one stage of the fixed schedule (its own warm-up and cosine) on ``batches`` of ``data``.

    Returns:
        The loss curve ``[[step, mean loss since the last point], ...]`` (steps counted from
        ``first_step``), the fraction of the labels seen that carried a training signal
        (`Task.supervised`), and the samples seen from each training set (of ``sizes``).
    """
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(_param_groups(model, lr), lr=lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
    ends = np.cumsum(sizes)
    seen = np.zeros(len(sizes), np.int64)
    every = max(1, steps // _CURVE_POINTS)
    curve: list[list[float]] = []
    running: list[float] = []
    supervised = []
    model.train()
    with tqdm(total=steps, desc=f"bench {task.name}{desc}", unit="step", disable=not progress) as bar:
        for step in range(steps):
            picked = next(batches)
            np.add.at(seen, np.searchsorted(ends, picked, side="right"), 1)
            items = [data[i] for i in picked]
            images = _images(items, device)
            target = task.target(items, tuple(images.shape[-2:])).to(device)
            supervised.append(task.supervised(target).float().mean().item())
            loss = task.loss(model(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running.append(loss.item())
            if (step + 1) % every == 0 or step + 1 == steps:
                curve.append([first_step + step + 1, float(np.mean(running))])
                bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
                running = []
            bar.update(1)
    return curve, float(np.mean(supervised)), seen.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task | str, test: LabeledFolderDataset, *, batch: int = 64,
             device: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Score ``model`` on every image of ``test`` (no augmentation); returns the task's metrics."""
    task = TASKS[task] if isinstance(task, str) else task
    device = torch.device(device)
    model.eval()
    predictions = []
    for start in range(0, len(test), batch):
        items = [test[i] for i in range(start, min(start + batch, len(test)))]
        predictions.append(task.predict(model(_images(items, device))))
    ls = test.labeled_set
    labels = {"seg": None if ls.seg is None else np.stack(ls.seg),
              "depth": None if ls.depth is None else np.stack(ls.depth),
              "keypoints": ls.keypoints}
    return score(task, np.concatenate(predictions), labels, test.classes, test.image_size)


def _like(test: LabeledFolderDataset, main: LabeledFolderDataset) -> LabeledFolderDataset:
    """``test``, checked to be scorable like ``main`` (same image size, class and keypoint names)."""
    for what, ours, theirs in (("image size", test.image_size, main.image_size), ("class names", test.classes,
                               main.classes), ("keypoint names", test.keypoint_names, main.keypoint_names)):
        if tuple(ours) != tuple(theirs):
            raise HandsoffError(f"{test.root}: its {what} differ from the test set's ({main.root})")
    return test


def _warnings(task: Task, supervised: float) -> list[str]:
    if supervised > 0:
        return []
    what = {"seg": "no labelled pixel (all 255)", "depth": "no valid depth",
            "keypoints": "no visible keypoint (visible / confidence >= 0.5)"}[task.name]
    return [f"the training set carried {what}: the model learnt nothing from it"]


def _union(train_sets: Sequence[Dataset]) -> Dataset:
    return train_sets[0] if len(train_sets) == 1 else ConcatDataset(list(train_sets))


def _seen(train_sets: Sequence[Dataset], counts: list[int]) -> list[dict[str, Any]]:
    """Samples seen per training set, and their share of all samples seen (the ``mix`` actually trained)."""
    total = max(1, sum(counts))
    return [{"path": describe(d).get("path"), "samples": c, "share": c / total} for d, c in zip(train_sets, counts)]


def _stage_seed(seed: int, stage: int) -> int:
    """Stage 0 keeps ``seed`` (the one-stage runs of before); later stages get independent streams."""
    return seed if stage == 0 else int(np.random.SeedSequence([seed, stage]).generate_state(1)[0])


def train_and_score(train_sets: Sequence[Dataset], test: LabeledSet | PathLike, task: str, *,
                    steps: int = DEFAULT_STEPS, batch: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = 0,
                    device: Union[str, torch.device] = "cpu", progress: bool = True, arch: str = "unet",
                    base: int = DEFAULT_BASE, levels: int = 4, extra: Optional[dict[str, Any]] = None,
                    also_test: Optional[Mapping[str, LabeledSet | PathLike]] = None, mix: Mix = None,
                    finetune: Optional[Sequence[Dataset]] = None, finetune_steps: Optional[int] = None,
                    finetune_lr: Optional[float] = None, pretrained: Optional[str] = None,
                    pretrained_weights: Optional[PathLike] = None,
                    pretrained_blocks: int = DEFAULT_PRETRAINED_BLOCKS,
                    return_model: bool = False) -> Union[dict[str, Any], tuple[dict[str, Any], torch.nn.Module]]:
    """Train a fresh downstream model for ``task`` on ``train_sets`` and score it on ``test``.

    Args:
        train_sets: datasets yielding `ShardDataset`-style dicts (`handsoff.bench.data`);
            they are mixed: samples are drawn uniformly from their union, or by ``mix``.
        test: the real labeled test set (a folder or a `LabeledSet`), never augmented.
        task: 'seg', 'keypoints' or 'depth'.
        steps, batch, lr: the fixed schedule (module docstring).
        seed: seeds weights, sample order and augmentation.
        device: where to train ('cpu', 'cuda', ...).
        progress: show a tqdm progress bar.
        arch, base, levels: the model (`handsoff.bench.models.build_model`).
        extra: recorded as is under ``"extra"`` in the result.
        also_test: more test sets, by name, scored with the same trained model (same image
            size, class and keypoint names as ``test``); their metrics go under ``metrics_on``.
        mix: each training set's share of every batch (`mix_shares`: None = uniform over the
            union; 0.5 = the last set is half of every batch).
        finetune: sets to fine-tune on after the ``steps`` on ``train_sets`` (pretrain-finetune:
            train on the corpus, then on the labeled images), uniform over their union.
        finetune_steps: the fine-tuning stage's steps (default: `FINETUNE_STEPS_FRACTION` of ``steps``).
        finetune_lr: its peak learning rate (default: `FINETUNE_LR_FACTOR` x ``lr``).
        pretrained, pretrained_weights, pretrained_blocks: start from an ImageNet encoder
            (`handsoff.bench.models.build_model`; its weights move at `PRETRAINED_LR_FACTOR` of
            the learning rate).
        return_model: also return the trained model (in eval mode), as ``(result, model)``:
            a teacher for `handsoff.bench.relabel`.

    Returns:
        A JSON-able dict: ``format``, ``task``, ``metrics`` (the task's scores, see
        `handsoff.bench.tasks`), ``primary_metric``, ``settings`` (schedule, model, ``mix``,
        ``finetune``, ``samples_seen`` per training set), ``train_sets`` (kind, path, size of
        each), ``train_size``, ``test`` (path, size, resolution), ``loss_curve`` (both stages),
        ``supervised_fraction`` (share of the labels seen in training that carried a signal:
        labelled pixels, valid depths or visible keypoints), ``warnings``, ``wall_time_s``
        (train, test, total), ``date``, ``versions``.

    Raises:
        HandsoffError: a bad test set, a training set that does not fit it (one line naming
            the folder), a bad ``mix`` or missing / bad pretrained weights, all checked before
            any training.
    """
    started = time.perf_counter()
    if task not in TASKS:
        raise HandsoffError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if steps < 1 or batch < 1 or not lr > 0:
        raise HandsoffError(f"need steps >= 1, batch >= 1 and lr > 0 (got {steps}, {batch}, {lr})")
    if finetune is not None:
        finetune_steps = max(1, round(FINETUNE_STEPS_FRACTION * steps)) if finetune_steps is None else finetune_steps
        finetune_lr = FINETUNE_LR_FACTOR * lr if finetune_lr is None else finetune_lr
        if finetune_steps < 1 or not finetune_lr > 0:
            raise HandsoffError(f"need --finetune-steps >= 1 and a fine-tuning lr > 0 (got {finetune_steps}, "
                                f"{finetune_lr})")
    mix_shares(len(train_sets), mix)  # refuse a bad mix before any work
    spec = TASKS[task]
    test_set = _test_set(test, spec)
    for sets in (train_sets, finetune) if finetune is not None else (train_sets,):
        check_train_sets(sets, spec, test_set.image_size, test_set.classes, test_set.keypoint_names,
                         str(test_set.root))
    other_tests = {name: _like(_test_set(t, spec), test_set) for name, t in (also_test or {}).items()}
    device = torch.device(device)
    data = _union(train_sets)
    _reseed_augmentation(train_sets, seed)
    sizes = [len(d) for d in train_sets]

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_model(task, spec.out_channels(test_set.classes, test_set.keypoint_names), arch=arch,
                            base=base, levels=levels, pretrained=pretrained, pretrained_weights=pretrained_weights,
                            pretrained_blocks=pretrained_blocks)
        source = getattr(model, "source", None)
        model = _calibrated(model, spec, data, test_set.image_size).to(device, memory_format=torch.channels_last)
        curve, supervised, seen = _train(model, spec, data, batch_indices(sizes, batch, seed, mix), sizes,
                                         steps=steps, lr=lr, device=device, progress=progress)
        finetune_record = None
        if finetune is not None:
            tune_seed = _stage_seed(seed, 1)
            _reseed_augmentation(finetune, tune_seed)
            tune_sizes = [len(d) for d in finetune]
            tune_curve, tune_supervised, tune_seen = _train(
                model, spec, _union(finetune), batch_indices(tune_sizes, batch, tune_seed), tune_sizes,
                steps=finetune_steps, lr=finetune_lr, device=device, progress=progress, first_step=steps,
                desc=" fine-tune")
            curve += tune_curve
            supervised = (supervised * steps + tune_supervised * finetune_steps) / (steps + finetune_steps)
            finetune_record = {"steps": finetune_steps, "lr": finetune_lr,
                               "train_sets": [describe(d) for d in finetune], "train_size": int(sum(tune_sizes)),
                               "samples_seen": _seen(finetune, tune_seen),
                               "schedule": "its own linear warm-up and cosine to 0, same optimizer settings"}
    trained = time.perf_counter()
    result_metrics = evaluate(model, spec, test_set, device=device)
    metrics_on = {name: evaluate(model, spec, t, device=device) for name, t in other_tests.items()}
    done = time.perf_counter()
    result = {
        "format": RESULT_FORMAT,
        "version": 1,
        "task": task,
        "metrics": result_metrics,
        "primary_metric": {"name": spec.primary[0], "higher_is_better": spec.primary[1],
                           "value": result_metrics[spec.primary[0]]},
        "settings": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "device": str(device),
                     "optimizer": f"AdamW (weight decay {WEIGHT_DECAY})",
                     "schedule": f"linear warm-up over {WARMUP_FRACTION:.0%} of the steps, then cosine to 0",
                     "model": {"arch": arch, "base": base, "levels": pretrained_blocks if pretrained else levels,
                               "parameters": count_parameters(model),
                               "pretrained": None if pretrained is None else {
                                   "encoder": pretrained, "blocks": pretrained_blocks, "weights": source,
                                   "lr_factor": PRETRAINED_LR_FACTOR}},
                     "mix": None if mix is None else {
                         "asked": mix if isinstance(mix, (int, float)) else list(mix),
                         "groups": [{"train_sets": sets, "share": share}
                                    for sets, share in mix_shares(len(train_sets), mix) or []],
                         "rule": "each group of training sets (indices into train_sets) is this share of every "
                                 "batch, uniform over its union"},
                     "samples_seen": _seen(train_sets, seen),
                     "finetune": finetune_record,
                     "output_calibration": ({"scale": float(model.scale), "shift": float(model.shift)}
                                            if isinstance(model, OutputAffine) else None),
                     "torch_threads": torch.get_num_threads()},
        **({"metrics_on": metrics_on} if other_tests else {}),
        "train_sets": [describe(d) for d in train_sets],
        "train_size": int(len(data)),
        "test": {"path": str(test_set.root), "size": len(test_set), "resolution": list(test_set.image_size)},
        "loss_curve": curve,
        "supervised_fraction": supervised,
        "warnings": _warnings(spec, supervised),
        "wall_time_s": {"train": round(trained - started, 2), "test": round(done - trained, 2),
                        "total": round(done - started, 2)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"handsoff": __version__, "torch": torch.__version__},
        "extra": extra or {},
    }
    return (result, model) if return_model else result
