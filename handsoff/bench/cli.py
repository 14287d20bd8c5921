"""``handsoff bench``: train a downstream model on labeled folders and/or corpora, score it on a real test set.

Registered through `handsoff.cli.STAGE_CLIS`; heavy modules are imported only when the
command runs, so ``handsoff --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]

DESCRIPTION = """\
Train a standard downstream model from scratch (a small UNet) for one task and score it on a
real labeled test folder. Each --train is a labeled-set folder (images/ ...; augmented: flips
with left/right label swaps, scale/crop, colour jitter) or a generated corpus (manifest.json +
shards); several --train are mixed, samples drawn uniformly from their union. The schedule is a
fixed number of optimizer steps, so training sets of any size get the same compute.

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
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand to the ``handsoff`` parser."""
    from handsoff.bench.defaults import DEFAULT_BASE, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, MODELS, TASK_NAMES

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
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; on a busy machine 1 is often fastest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> None:
    from handsoff.bench.data import open_train_set
    from handsoff.bench.train import train_and_score
    from handsoff.utils.io import atomic_path
    from handsoff.utils.runtime import resolve_device

    from handsoff.errors import HandsoffError

    if args.out.is_dir():
        raise HandsoffError(f"{args.out}: is a folder; --out takes a JSON file name")
    if args.threads is not None:
        if args.threads < 1:
            raise HandsoffError(f"--threads must be at least 1 (got {args.threads})")
        import torch

        torch.set_num_threads(args.threads)
    train_sets = [open_train_set(path, augment=not args.no_augment, seed=args.seed,
                                 max_uncertainty_quantile=args.max_uncertainty_quantile) for path in args.train]
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:  # torch's own message for a malformed device string
        raise HandsoffError(f"--device {args.device!r}: {' '.join(str(err).split())}") from None
    result = train_and_score(train_sets, args.test, args.task, steps=args.steps, batch=args.batch, lr=args.lr,
                             seed=args.seed, device=device, progress=not args.no_progress,
                             arch=args.model, base=args.width,
                             extra={"command": "handsoff bench",
                                    "max_uncertainty_quantile": args.max_uncertainty_quantile,
                                    "augment_folders": not args.no_augment})
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for warning in result["warnings"]:
        print(f"handsoff bench: warning: {warning}", file=sys.stderr)
    shown = {k: v for k, v in result["metrics"].items() if isinstance(v, float)}
    print(f"{args.task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) +
          f" ({result['train_size']} training samples, {args.steps} steps, "
          f"{result['wall_time_s']['total']:.0f} s); wrote {args.out}")
