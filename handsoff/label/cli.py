"""``handsoff fit-labeler``: train a hypercolumn labeler from a labeled set and its latents."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from handsoff.defaults import DEFAULT_GENERATOR
from handsoff.errors import HandsoffError
from handsoff.utils.threads import add_threads_option

__all__ = ["register", "parse_int_list"]

DESCRIPTION = (
    "Train an ensemble of per-pixel MLPs on the generator's synthesis features of labeled images (HandsOff). "
    "The latents file (from `handsoff invert`) must hold a W+ code for every image of --labels and be made for "
    "--generator. Learns every task the labeled set carries (segmentation, keypoints, depth) unless --tasks "
    "names some. With --heldout-latents and --heldout-labels, scores the labeler on that set at the end and "
    "writes the scores to OUT.report.json and into the labeler's metadata.")


def parse_int_list(text: str, what: str) -> list[int]:
    """``"256,32"`` or ``"-2,-1"`` or ``"0-3,8"`` -> ints (``a-b`` ranges are inclusive, a, b >= 0)."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)-(\d+)", part)
        if match and int(match[1]) <= int(match[2]):
            values.extend(range(int(match[1]), int(match[2]) + 1))
        elif re.fullmatch(r"-?\d+", part):
            values.append(int(part))
        else:
            raise HandsoffError(f"{what} {text!r}: cannot read {part!r} (use e.g. 256,32 or 0-3,-1)")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    from handsoff.label.defaults import (DEFAULT_BATCH_PIXELS, DEFAULT_FLOW_METHOD, DEFAULT_STEPS, DEFAULT_TRANSFER,
                                         FLOW_METHODS, TRANSFER_MODES)

    p = sub.add_parser("fit-labeler", help="train a hypercolumn labeler on labeled images and their latents",
                       description=DESCRIPTION)
    p.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR,
                   help="generator checkpoint (default: the shipped built-in-domain generator)")
    p.add_argument("--latents", type=Path, required=True, help="latents .safetensors of the labeled images")
    p.add_argument("--labels", type=Path, required=True, help="labeled-set folder (images/, seg/, depth/, ...)")
    p.add_argument("--out", type=Path, required=True, help="labeler .safetensors to write")
    p.add_argument("--tasks", default=None, help="comma-separated subset of seg,keypoints,depth (default: all present)")
    p.add_argument("--ensemble", type=int, default=10, help="ensemble members (default: 10)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Adam steps (default: {DEFAULT_STEPS})")
    p.add_argument("--batch-pixels", type=int, default=DEFAULT_BATCH_PIXELS,
                   help=f"pixels per member per step (default: {DEFAULT_BATCH_PIXELS})")
    p.add_argument("--hidden", default="256,32", help="hidden widths of each MLP (default: 256,32)")
    p.add_argument("--layers", default=None,
                   help="feature maps to use, e.g. 0-8, or --layers=-2,-1 for the last two (default: all)")
    p.add_argument("--label-resolution", type=int, default=None,
                   help="side of the label maps (default: the generator's resolution)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    p.add_argument("--class-balanced", action="store_true", help="sample segmentation classes uniformly")
    p.add_argument("--transfer-labels", choices=TRANSFER_MODES, default=DEFAULT_TRANSFER,
                   help="none: train on the labels as given; flow: first move each image's labels onto its "
                        "reconstruction G(w) by dense optical flow (real image <-> reconstruction, --flow-method), "
                        "so that a part the inversion draws elsewhere keeps its label; pixels and keypoints whose "
                        "flow fails a forward-backward check are left out of training (default: "
                        f"{DEFAULT_TRANSFER}: better than none on every task, benchmarks/levers.py)")
    p.add_argument("--flow-method", choices=FLOW_METHODS, default=DEFAULT_FLOW_METHOD,
                   help=f"optical flow of --transfer-labels flow (default: {DEFAULT_FLOW_METHOD})")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and pixel sampling (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    add_threads_option(p)
    p.add_argument("--heldout-latents", type=Path, default=None, help="latents of a held-out labeled set")
    p.add_argument("--heldout-labels", type=Path, default=None, help="held-out labeled-set folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(run=_run_fit_labeler)


def _check_output(args: argparse.Namespace) -> None:
    if args.out.suffix != ".safetensors":
        raise HandsoffError(f"{args.out}: the labeler file must end in .safetensors")
    if args.out.exists() and not args.force:
        raise HandsoffError(f"{args.out}: already exists (use --force to overwrite)")
    if (args.heldout_latents is None) != (args.heldout_labels is None):
        raise HandsoffError("--heldout-latents and --heldout-labels go together")


def _load_set(G, latents_path: Path, labels_path: Path):
    """The labeled set at ``labels_path`` and the rows of ``latents_path`` for its images, checked."""
    from handsoff.data.labeled_set import read_labeled_set
    from handsoff.gan.digest import generator_digest
    from handsoff.invert.latents import load_latents

    labels = read_labeled_set(labels_path)
    latents = load_latents(latents_path, expect_digest=generator_digest(G), expect_shape=(G.num_ws, G.w_dim))
    return labels, latents.select(labels.names, latents_path)


def _check_compatible(train, heldout) -> None:
    """Refuse (before training) a held-out set whose class or keypoint names differ from the training set's."""
    if train.seg is not None and heldout.seg is not None and train.classes != heldout.classes:
        raise HandsoffError(f"{heldout.root}: classes {list(heldout.classes)} differ from {train.root}'s "
                            f"{list(train.classes)}")
    if train.keypoints is not None and heldout.keypoints is not None and \
            train.keypoint_names != heldout.keypoint_names:
        raise HandsoffError(f"{heldout.root}: keypoint names {list(heldout.keypoint_names)} differ from "
                            f"{train.root}'s {list(train.keypoint_names)}")


def report_path(out: Path) -> Path:
    """``L.safetensors`` -> ``L.report.json``."""
    return out.with_name(out.stem + ".report.json")


def _summary(scores: dict) -> dict[str, Optional[float]]:
    """The headline held-out numbers: mIoU, PCK@0.1, depth RMSE (None for absent tasks)."""
    return {"miou": scores.get("seg", {}).get("miou"),
            "pck@0.1": scores.get("keypoints", {}).get("pck@0.1"),
            "depth_rmse": scores.get("depth", {}).get("rmse")}


def _run_fit_labeler(args: argparse.Namespace) -> None:
    from handsoff.gan.checkpoints import load_generator
    from handsoff.label.evaluate import evaluate_labeler
    from handsoff.label.io import save_labeler
    from handsoff.label.train import fit_labeler
    from handsoff.utils.io import atomic_write_bytes
    from handsoff.utils.runtime import resolve_device

    _check_output(args)
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    hidden = parse_int_list(args.hidden, "--hidden")
    layers = None if args.layers is None else parse_int_list(args.layers, "--layers")
    device = resolve_device(args.device)
    G = load_generator(args.generator, device=device)
    labels, ws = _load_set(G, args.latents, args.labels)
    heldout = None
    if args.heldout_labels is not None:  # read and check before the long part
        heldout = _load_set(G, args.heldout_latents, args.heldout_labels)
        _check_compatible(labels, heldout[0])

    settings = {"labels": str(args.labels), "images": len(labels), "tasks": tasks, "ensemble": args.ensemble,
                "steps": args.steps, "batch_pixels": args.batch_pixels, "hidden": hidden, "layers": layers,
                "label_resolution": args.label_resolution, "lr": args.lr, "class_balanced": args.class_balanced,
                "seed": args.seed, "transfer_labels": args.transfer_labels,
                "flow_method": args.flow_method if args.transfer_labels == "flow" else None}
    labeler = fit_labeler(G, ws, labels, tasks=tasks, ensemble=args.ensemble, hidden=hidden, layers=layers,
                          label_resolution=args.label_resolution, steps=args.steps, batch_pixels=args.batch_pixels,
                          lr=args.lr, seed=args.seed, device=device, class_balanced=args.class_balanced,
                          transfer_labels=args.transfer_labels, flow_method=args.flow_method)
    extra: dict = {"training": settings}
    report = None
    if heldout is not None:
        scores = evaluate_labeler(G, labeler, heldout[1], heldout[0])
        extra["heldout"] = {"labels": str(args.heldout_labels), **_summary(scores)}
        report = {"labeler": str(args.out), "training": settings, "heldout": scores}
    save_labeler(args.out, labeler, G, extra=extra)
    if report is not None:
        atomic_write_bytes(report_path(args.out), (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {args.out} (tasks: {', '.join(labeler.config.tasks)}; {labeler.config.ensemble} members)")
    if heldout is not None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in extra["heldout"].items() if isinstance(v, float))
        print(f"held-out {args.heldout_labels}: {shown} (details in {report_path(args.out)})")
